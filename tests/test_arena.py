"""The preference arena through its HTTP API: the judging flow, durability, export, refusals."""

import io
import json
import re
import tempfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture
def evaluation(tiny_evaluation) -> Path:
    """The shared small evaluation (conftest) that compare mode draws pairs from."""
    return tiny_evaluation


def arena(tmp_path, **settings):
    from fastapi.testclient import TestClient

    from pickalign.eval.arena.app import create_app
    from pickalign.eval.arena.config import ArenaConfig

    settings.setdefault("database", f"sqlite:///{tmp_path / 'arena.db'}")
    settings.setdefault("images_dir", str(tmp_path / "images"))
    config = ArenaConfig(**settings)
    return TestClient(create_app(config, "the-admin-token")), config


def session(client) -> dict:
    """Open the page (the rater cookie) and return the headers a POST needs."""
    page = client.get("/")
    assert page.status_code == 200
    return {"X-CSRF-Token": re.search(r'name="csrf" content="([0-9a-f]+)"', page.text)[1]}


def judgment(pair: dict, choice: str = "left", uid: str | None = None) -> dict:
    import uuid

    return {
        "uid": uid or uuid.uuid4().hex,
        "pair": pair["pair"],
        "choice": choice,
        "latency_ms": 1500,
    }


def rows(config) -> list[dict]:
    from pickalign.eval.arena.store import all_judgments, open_engine

    return all_judgments(open_engine(config.database))


def test_compare_mode_records_each_judgment_once_with_its_sides_and_latency(evaluation, tmp_path):
    client, config = arena(tmp_path, mode="compare", evaluation=str(evaluation))
    headers = session(client)
    manifest = [json.loads(x) for x in (evaluation / "manifest.jsonl").read_text().splitlines()]
    by_path = {row["path"]: row for row in manifest}
    choices = ["left", "right", "tie", "left"]
    answers, sent = [], []
    for choice in choices:
        pair = client.post("/api/pair", json={}, headers=headers).json()
        assert "model" not in json.dumps(pair)  # model names stay hidden
        sent.append(judgment(pair, choice))
        answers.append((pair, client.post("/api/judge", json=sent[-1], headers=headers)))
    assert [a.json()["count"] for _, a in answers] == [1, 2, 3, 4]
    # a retried request (the same judgment uid) is not counted twice
    again = client.post("/api/judge", json=sent[0], headers=headers)
    assert again.json() == {"id": answers[0][1].json()["id"], "duplicate": True, "count": 4}
    stored = rows(config)
    assert [r["choice"] for r in stored] == choices
    for (pair, _), row in zip(answers, stored):
        assert (row["left_uid"], row["right_uid"]) == (pair["left"]["uid"], pair["right"]["uid"])
        assert row["latency_ms"] == 1500 and row["mode"] == "compare"
        assert (row["decided_at"] - row["shown_at"]).total_seconds() == pytest.approx(1.5)
        left, right = by_path[row["left_source"]], by_path[row["right_source"]]
        assert left["index"] == right["index"] and left["model"] != right["model"]
        assert row["prompt"] == left["prompt"] and row["left_model"] == left["model"]
        image = client.get(pair["left"]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        shown = Image.open(io.BytesIO(image.content)).convert("RGB")
        assert list(shown.getdata()) == list(
            Image.open(evaluation / left["path"]).convert("RGB").getdata()
        )


def test_the_export_is_a_pickapic_dataset_and_a_judgments_table_the_evaluation_reads(
    evaluation, tmp_path
):
    import pandas as pd

    from pickalign.eval.arena.export import export
    from pickalign.eval.arena.store import open_engine
    from pickalign.eval.results import human_win_rates, read_table
    from pickalign.reward.data import PICKAPIC_COLUMNS, inspect_split, iter_pairs, load_pickapic

    client, config = arena(tmp_path, mode="compare", evaluation=str(evaluation))
    headers = session(client)
    for k in range(12):
        pair = client.post("/api/pair", json={}, headers=headers).json()
        client.post(
            "/api/judge", json=judgment(pair, ["left", "right", "tie"][k % 3]), headers=headers
        )
    sizes = export(open_engine(config.database), config.images_dir, tmp_path / "export", 0.3, 0.3)
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 12 == sizes["judgments"]
    exported = []
    present = [split for split in ("train", "validation", "test") if sizes[split]]
    for split in ("train", "validation", "test"):
        assert (tmp_path / "export/data" / f"{split}-00000-of-00001.parquet").exists() == bool(
            sizes[split]
        )
    for split in present:
        table = pd.read_parquet(tmp_path / "export" / "data" / f"{split}-00000-of-00001.parquet")
        assert list(table.columns) == list(PICKAPIC_COLUMNS)
        exported += table.to_dict("records")
        if len(table):
            assert inspect_split(tmp_path / "export", split, progress=False).pairs == len(table)
    labels = sorted((r["label_0"], r["label_1"]) for r in exported)
    assert labels == sorted([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)] * 4)
    # every prompt's judgments in one split
    splits = {}
    for split in present:
        for pair in iter_pairs(load_pickapic(tmp_path / "export", split)):
            splits.setdefault(pair.prompt, set()).add(split)
    assert all(len(s) == 1 for s in splits.values())
    # the judgments table gives the evaluation its human win rates
    manifest = [json.loads(x) for x in (evaluation / "manifest.jsonl").read_text().splitlines()]
    human = human_win_rates(read_table(tmp_path / "export" / "judgments.csv"), manifest)
    assert human["judgments"] == 12
    pairs = sum(
        r["wins"] + r["ties"] + r["losses"] for a in human["win_rates"].values() for r in a.values()
    )
    assert pairs == 24  # each judgment counted once from each side


def test_generate_mode_replaces_the_rejected_image_until_the_prompt_changes(tiny_models, tmp_path):
    models = [{"name": "sd", "model": str(tiny_models["sd"])}]
    client, config = arena(tmp_path, mode="generate", models=models, steps=2)
    headers = session(client)
    prompt = "a red circle on a blue background"
    pair = client.post("/api/pair", json={"prompt": prompt}, headers=headers).json()
    assert pair["prompt"] == prompt and pair["left"]["uid"] != pair["right"]["uid"]
    after_left = client.post("/api/judge", json=judgment(pair, "left"), headers=headers).json()[
        "next"
    ]
    assert after_left["left"] == pair["left"] and after_left["right"] != pair["right"]
    tie = judgment(after_left, "tie")
    after_tie = client.post("/api/judge", json=tie, headers=headers).json()["next"]
    retried = client.post("/api/judge", json=tie, headers=headers).json()  # its answer was lost
    assert retried["duplicate"] and retried["next"]["left"]["uid"] != after_left["left"]["uid"]
    assert {after_tie["left"]["uid"], after_tie["right"]["uid"]}.isdisjoint(
        {after_left["left"]["uid"], after_left["right"]["uid"]}
    )
    assert after_tie["prompt"] == prompt
    assert [r["choice"] for r in rows(config)] == ["left", "tie"]
    assert {r["left_model"] for r in rows(config)} == {"sd"}


HOSTILE_PROMPTS = [
    "<script>alert('x')</script> a cat",
    '"><img src=x onerror=alert(1)>',
    "a cat'; DROP TABLE judgments; --",
    "1 OR 1=1; DELETE FROM images",
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_hostile_prompts_are_stored_as_text_and_never_become_markup_or_sql(
    tiny_models, tmp_path, prompt
):
    models = [{"name": "sd", "model": str(tiny_models["sd"])}]
    client, config = arena(tmp_path, mode="generate", models=models, steps=2, title=prompt)
    headers = session(client)
    page = client.get("/").text
    assert "<script>alert" not in page and "<img src=x" not in page
    if "<" in prompt:  # the title is escaped
        assert prompt not in page and "&lt;" in page
    assert "default-src 'self'" in client.get("/").headers["content-security-policy"]
    pair = client.post("/api/pair", json={"prompt": prompt}, headers=headers).json()
    assert pair["prompt"] == prompt  # JSON, shown with textContent by the page
    client.post("/api/judge", json=judgment(pair), headers=headers)
    stored = rows(config)
    assert len(stored) == 1 and stored[0]["prompt"] == prompt  # the tables are intact
    assert "textContent" in (Path(__file__).parents[1] / "eval/arena/static/arena.js").read_text()
    assert "innerHTML" not in (Path(__file__).parents[1] / "eval/arena/static/arena.js").read_text()


def test_refusals(evaluation, tmp_path, tiny_models, monkeypatch):
    client, config = arena(
        tmp_path, mode="compare", evaluation=str(evaluation), judgments_per_minute=8
    )
    headers = session(client)
    pair = client.post("/api/pair", json={}, headers=headers).json()
    good = judgment(pair)

    def refused(response, status, words):
        assert response.status_code == status, response.text
        assert words in response.json()["error"]

    # CSRF: missing, forged, and a rater cookie that was not signed here
    refused(client.post("/api/judge", json=good), 403, "CSRF")
    refused(client.post("/api/judge", json=good, headers={"X-CSRF-Token": "0" * 64}), 403, "CSRF")
    from fastapi.testclient import TestClient

    stranger = TestClient(client.app)
    stranger.cookies.set("rater", "someone.forged")
    refused(stranger.post("/api/judge", json=good, headers=headers), 403, "no rater session")
    # bad fields
    refused(
        client.post("/api/judge", json=good | {"choice": "both"}, headers=headers), 422, "choice"
    )
    refused(
        client.post("/api/judge", json=good | {"pair": "f" * 32}, headers=headers),
        422,
        "not a pair served to you",
    )
    refused(
        client.post("/api/judge", json=good | {"latency_ms": "NaN"}, headers=headers),
        422,
        "latency_ms",
    )
    # oversized bodies, declared or streamed
    refused(
        client.post("/api/pair", content=b"{" + b" " * 9000 + b"}", headers=headers), 413, "over"
    )

    def streamed():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    refused(client.post("/api/pair", content=streamed(), headers=headers), 413, "over")
    # images by uid only: traversal and other names are not found
    for name in ("..%2Farena_secret", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "x.png"):
        response = client.get(f"/images/{name}")
        assert response.status_code == 404 and b"arena_secret" not in response.content
    assert client.get("/images/../arena_secret").status_code == 404
    # admin routes need the token
    refused(client.get("/admin/export"), 403, "admin")
    refused(client.get("/admin/stats", headers={"Authorization": "Bearer nope"}), 403, "admin")
    stats = client.get("/admin/stats", headers={"Authorization": "Bearer the-admin-token"})
    assert stats.status_code == 200
    # the rate limit, 8 a minute per rater: the pair and two bad fields above count; requests
    # refused before the rater is known (CSRF, body size, a body that does not validate) do not
    assert client.post("/api/judge", json=good, headers=headers).status_code == 200
    refused(client.post("/api/judge", json=judgment(pair), headers=headers), 409, "judged already")
    pair = client.post("/api/pair", json={}, headers=headers).json()
    assert client.post("/api/judge", json=judgment(pair), headers=headers).status_code == 200
    pair = client.post("/api/pair", json={}, headers=headers).json()  # the 8th counted request
    refused(client.post("/api/judge", json=judgment(pair), headers=headers), 429, "rate limit")
    assert len(rows(config)) == 2
    scratch = tmp_path / "tmp"  # where the export is built: nothing of it stays
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    exported = client.get("/admin/export", headers={"Authorization": "Bearer the-admin-token"})
    assert exported.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(exported.content)).namelist()
    assert "judgments.csv" in names and any(n.endswith("-00000-of-00001.parquet") for n in names)
    assert list(scratch.iterdir()) == []


def test_a_long_prompt_is_refused(tiny_models, tmp_path):
    models = [{"name": "sd", "model": str(tiny_models["sd"])}]
    client, _ = arena(tmp_path, mode="generate", models=models, max_prompt_chars=20)
    headers = session(client)
    response = client.post("/api/pair", json={"prompt": "a" * 21}, headers=headers)
    assert response.status_code == 422 and "over 20 characters" in response.json()["error"]


def test_arena_configs_parse_and_refuse_what_cannot_work():
    from pickalign.config import ConfigError, parse_config
    from pickalign.eval.arena.config import ArenaConfig

    for path in sorted((Path(__file__).parents[1] / "recipes/configs/arena").glob("*.yaml")):
        config = parse_config(ArenaConfig, ["--config", str(path)])
        assert "Launch" in path.read_text().split("\nmode:")[0]
        assert config.mode in ("generate", "compare")
    with pytest.raises(ConfigError, match="needs at least one model"):
        ArenaConfig(mode="generate")
    with pytest.raises(ConfigError, match="needs an evaluation folder"):
        ArenaConfig(mode="compare")
    with pytest.raises(ConfigError, match="mode: got 'vote'"):
        ArenaConfig(mode="vote")


def test_a_regenerated_evaluation_is_not_shown_with_the_earlier_images(evaluation, tmp_path):
    import shutil

    client, _ = arena(tmp_path, mode="compare", evaluation=str(evaluation))
    first = client.post("/api/pair", json={}, headers=session(client)).json()
    # the same paths, made again for other prompts, with the same database
    again = tmp_path / "again"
    shutil.copytree(evaluation, again)
    rows = [json.loads(x) for x in (again / "manifest.jsonl").read_text().splitlines()]
    text = "".join(json.dumps({**r, "prompt": "new " + r["prompt"]}) + "\n" for r in rows)
    (again / "manifest.jsonl").write_text(text)
    client, _ = arena(tmp_path, mode="compare", evaluation=str(again))
    pair = client.post("/api/pair", json={}, headers=session(client)).json()
    assert pair["prompt"].startswith("new ")
    assert {pair["left"]["uid"], pair["right"]["uid"]}.isdisjoint(
        {first["left"]["uid"], first["right"]["uid"]}
    )
