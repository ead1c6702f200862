"""The arena under attack, on SQLite and PostgreSQL: every JSON field and header fuzzed with
control characters, lone surrogates, overlong values, wrong types and non-finite numbers, and
bodies that are not JSON or not UTF-8. No answer is a 5xx or echoes the bad input, a refused
request stores nothing, only a pair served to a rater can be judged (once), and the legitimate
judgments are intact afterwards."""

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.conftest import require_postgres
from tests.test_arena import arena, judgment, session

MARK = "QZX"  # a marker in every fuzzed string: an answer that echoes the input shows it
BAD_VALUES = [
    f"{MARK}\x00",
    f"a{MARK}\x00b",
    f"\x1b[31m{MARK}",
    f"{MARK}\x7f\x85",
    f"{MARK}\ud800",
    f"a\udfff{MARK}b",
    MARK * 1000,
    "",
    " \t\n",
    123,
    1.5,
    True,
    None,
    [MARK],
    {MARK: MARK},
    float("nan"),
    float("inf"),
    -float("inf"),
    "NaN",
]
RAW_BODIES = [
    b"\xff\xfe\x00" + MARK.encode(),
    b'{"prompt": "\xff\xfe' + MARK.encode() + b'"}',
    b"not json " + MARK.encode(),
    b"[]",
    b"null",
    b'{"prompt": NaN}',
    b'{"prompt": "\\ud800' + MARK.encode() + b'"}',
    b'{"latency_ms": Infinity}',
]
JSON = "application/json"
CONTENT_TYPES = [JSON, "text/plain; charset=utf-8", "multipart/form-data", None]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'arena.db'}"
        return
    require_postgres()
    from bench.arena_load import PostgresServer

    with PostgresServer() as url:
        yield url


@pytest.fixture
def fresh(database):
    """The module's database, emptied after each test."""
    yield database
    from pickalign.eval.arena.store import Base, open_engine

    Base.metadata.drop_all(open_engine(database))


def counts(database) -> dict[str, int]:
    from pickalign.eval.arena.store import ImageRow, JudgmentRow, PairRow, open_engine

    with Session(open_engine(database)) as s:
        return {
            row.__tablename__: s.scalar(select(func.count()).select_from(row))
            for row in (ImageRow, PairRow, JudgmentRow)
        }


def post_raw(client, url: str, body: bytes, headers: dict, content_type: str | None):
    headers = dict(headers)
    if content_type:
        headers["Content-Type"] = content_type
    return client.post(url, content=body, headers=headers)


def refused_cleanly(response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])
    assert MARK not in response.text, response.text[:200]  # the input is not echoed back
    assert isinstance(response.json()["error"], str)


def test_fuzzed_fields_headers_and_bodies_get_a_4xx_and_store_nothing(fresh, tiny_models, tmp_path):
    models = [{"name": "sd", "model": str(tiny_models["sd"])}]
    client, config = arena(
        tmp_path,
        mode="generate",
        models=models,
        steps=1,
        database=fresh,
        judgments_per_minute=10**6,
    )
    headers = session(client)
    legit = client.post("/api/pair", json={"prompt": "a red circle"}, headers=headers).json()
    kept = judgment(legit, "right")
    assert client.post("/api/judge", json=kept, headers=headers).status_code == 200
    served = client.post("/api/pair", json={"prompt": "a blue square"}, headers=headers).json()
    before = counts(fresh)
    # every JSON field of both routes, one bad value at a time, and missing
    bodies = [("/api/pair", {"prompt": v}) for v in BAD_VALUES if v != "NaN"]  # a fine prompt
    for field in ("uid", "pair", "choice", "latency_ms"):
        good = judgment(served)
        for value in BAD_VALUES:
            if field == "latency_ms" and value in (123, 1.5, True):
                continue  # a valid latency: that judgment would be accepted
            bodies.append(("/api/judge", {**good, field: value}))
        bodies.append(("/api/judge", {k: v for k, v in good.items() if k != field}))
    bodies.append(("/api/judge", {**judgment(served), "pair": legit["pair"]}))  # judged already
    for url, body in bodies:
        refused_cleanly(post_raw(client, url, json.dumps(body).encode(), headers, JSON))
    for url in ("/api/pair", "/api/judge"):
        for body in RAW_BODIES:
            for content_type in CONTENT_TYPES:
                refused_cleanly(post_raw(client, url, body, headers, content_type))
    # headers: tokens and cookies that are not ASCII, not valid UTF-8, overlong or empty
    for token in ("é" * 64, "\udcff", "x" * 5000, "", MARK):
        raw = token.encode("utf-8", "surrogateescape")
        refused_cleanly(client.post("/api/judge", json=kept, headers={"X-CSRF-Token": raw}))
        for route in ("/admin/stats", "/admin/export"):
            refused_cleanly(client.get(route, headers={"Authorization": b"Bearer " + raw}))
    from fastapi.testclient import TestClient

    for cookie in ("é.é", "\udcff.x", "abc.", ".", "a" * 3000 + ".b", f"{MARK}.{MARK}"):
        raw = b"rater=" + cookie.encode("utf-8", "surrogateescape")
        page = TestClient(client.app).get("/", headers={"Cookie": raw})
        assert page.status_code == 200  # a new session, not a 500
        answer = TestClient(client.app).post(
            "/api/judge", json=kept, headers={**headers, "Cookie": raw}
        )
        refused_cleanly(answer)
    assert counts(fresh) == before  # nothing stored by any refused request
    # the legitimate judgment is intact, and the served pair can still be judged once
    from pickalign.eval.arena.store import all_judgments, open_engine

    (row,) = all_judgments(open_engine(fresh))
    assert (row["uid"], row["choice"], row["prompt"]) == (kept["uid"], "right", "a red circle")
    assert client.post("/api/judge", json=judgment(served), headers=headers).status_code == 200
    assert len(all_judgments(open_engine(fresh))) == 2


def test_prompts_are_normalised_in_one_place_the_same_on_both_databases(
    fresh, tiny_models, tmp_path
):
    models = [{"name": "sd", "model": str(tiny_models["sd"])}]
    client, _ = arena(tmp_path, mode="generate", models=models, steps=1, database=fresh)
    headers = session(client)
    for typed, stored in (
        ("  a  re\u0301d\tcircle\n", "a r\u00e9d circle"),  # NFC, whitespace runs as one space
        ("\u00e9t\u00e9 \U0001f600", "\u00e9t\u00e9 \U0001f600"),
    ):
        answer = client.post("/api/pair", json={"prompt": typed}, headers=headers)
        assert answer.status_code == 200 and answer.json()["prompt"] == stored
    for bad, reason in (
        ("a\x00b", "control characters"),
        ("a\x1fb", "control characters"),  # whitespace to Python's split, still refused
        ("a\x85b", "control characters"),
        ("a\ud800", "not valid Unicode"),
    ):
        body = json.dumps({"prompt": bad}).encode()  # a lone surrogate as JSON writes it
        answer = post_raw(client, "/api/pair", body, headers, JSON)
        assert answer.status_code == 422 and reason in answer.json()["error"]


def test_only_a_pair_served_to_the_rater_can_be_judged_and_only_once(
    fresh, tiny_evaluation, tmp_path
):
    from fastapi.testclient import TestClient

    from pickalign.eval.arena.store import all_judgments, count_judgments, open_engine

    client, _ = arena(tmp_path, mode="compare", evaluation=str(tiny_evaluation), database=fresh)
    other = TestClient(client.app)
    mine, theirs = session(client), session(other)
    first = client.post("/api/pair", json={}, headers=mine).json()
    second = client.post("/api/pair", json={}, headers=mine).json()
    # another rater cannot judge my pair
    answer = other.post("/api/judge", json=judgment(first), headers=theirs)
    assert answer.status_code == 422 and "not a pair served to you" in answer.json()["error"]
    assert counts(fresh)["judgments"] == 0
    # a judgment names the served pair; free image ids (one pair's left, another's right) do not
    mixed = {
        **{k: v for k, v in judgment(first).items() if k != "pair"},
        "left": first["left"]["uid"],
        "right": second["right"]["uid"],
    }
    assert client.post("/api/judge", json=mixed, headers=mine).status_code == 422
    once = judgment(first, "left")
    assert client.post("/api/judge", json=once, headers=mine).json()["duplicate"] is False
    assert client.post("/api/judge", json=once, headers=mine).json()["duplicate"] is True
    again = client.post("/api/judge", json=judgment(first, "right"), headers=mine)
    assert again.status_code == 409 and "judged already" in again.json()["error"]
    reused = client.post("/api/judge", json={**judgment(second), "uid": once["uid"]}, headers=mine)
    assert reused.status_code == 409 and "another pair" in reused.json()["error"]
    changed = client.post("/api/judge", json={**once, "choice": "tie"}, headers=mine)
    assert changed.status_code == 409 and "another choice" in changed.json()["error"]
    theirs_pair = other.post("/api/pair", json={}, headers=theirs).json()
    assert other.post("/api/judge", json=judgment(theirs_pair), headers=theirs).status_code == 200
    engine = open_engine(fresh)
    stored = all_judgments(engine)
    assert [(r["left_uid"], r["right_uid"]) for r in stored] == [
        (p["left"]["uid"], p["right"]["uid"]) for p in (first, theirs_pair)
    ]
    assert [r["choice"] for r in stored] == ["left", "left"] and count_judgments(engine) == 2
    admin = {"Authorization": "Bearer the-admin-token"}
    assert client.get("/admin/stats", headers=admin).json()["judgments"] == 2


def test_judgments_from_before_served_pairs_are_kept_out_of_counts_and_exports(tmp_path):
    import sqlite3

    from pickalign.eval.arena.store import all_judgments, count_judgments, open_engine

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the schema before pairs were recorded
        old.executescript(
            "CREATE TABLE images (uid VARCHAR(32) PRIMARY KEY, prompt VARCHAR(2000), model"
            " VARCHAR(200), seed INTEGER, source VARCHAR(1000), created_at DATETIME);"
            "CREATE TABLE judgments (id INTEGER PRIMARY KEY, uid VARCHAR(36) UNIQUE, rater"
            " VARCHAR(64), mode VARCHAR(16), prompt VARCHAR(2000), left_uid VARCHAR(32),"
            " right_uid VARCHAR(32), choice VARCHAR(8), shown_at DATETIME, decided_at DATETIME,"
            " latency_ms FLOAT, created_at DATETIME);"
            "INSERT INTO images VALUES ('a', 'p', 'm', 0, NULL, '2026-01-01 00:00:00');"
            "INSERT INTO images VALUES ('b', 'p', 'm', 1, NULL, '2026-01-01 00:00:00');"
            f"INSERT INTO judgments VALUES (1, '{uuid.uuid4().hex}', 'r', 'compare', 'p', 'a',"
            " 'b', 'left', '2026-01-01 00:00:00', '2026-01-01 00:00:01', 1000, NULL);"
        )
    engine = open_engine(f"sqlite:///{path}")
    assert count_judgments(engine) == 0 and all_judgments(engine) == []
    assert counts(f"sqlite:///{path}")["judgments"] == 1  # kept, not counted


def test_framework_refusals_admin_scheme_busy_models_and_a_broken_export_answer_in_json(
    tiny_models, tiny_evaluation, tmp_path, monkeypatch
):
    from pickalign.eval.arena.pairs import Painter

    client, config = arena(tmp_path, mode="compare", evaluation=str(tiny_evaluation))
    headers = session(client)
    for response in (
        client.get("/no/such/route"),
        client.put("/api/judge", json={}),
        client.get("/images/" + "0" * 32 + ".png"),
        client.get("/admin/stats", headers={"Authorization": "the-admin-token"}),  # no scheme
    ):
        refused_cleanly(response)
    admin = {"Authorization": "Bearer the-admin-token"}
    assert client.get("/admin/stats", headers=admin).status_code == 200
    # an export whose judged image file went missing says which, as a 409
    pair = client.post("/api/pair", json={}, headers=headers).json()
    assert client.post("/api/judge", json=judgment(pair), headers=headers).status_code == 200
    (Path(config.images_dir) / f"{pair['left']['uid']}.png").unlink()
    missing = client.get("/admin/export", headers=admin)
    assert missing.status_code == 409 and pair["left"]["uid"] in missing.json()["error"]
    # more draws waiting than the models serve: come back later, not a held thread
    monkeypatch.setattr(Painter, "MAX_WAITING", 0)
    models = [{"name": "sd", "model": str(tiny_models["sd"])}]
    busy, _ = arena(tmp_path / "busy", mode="generate", models=models, steps=1)
    answer = busy.post("/api/pair", json={"prompt": "a red circle"}, headers=session(busy))
    assert answer.status_code == 429 and "busy" in answer.json()["error"]
