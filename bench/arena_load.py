"""Load on the preference arena over loopback: N concurrent raters x M judgments each, against a
real server process (uvicorn) on SQLite (WAL) and on a PostgreSQL server started here.

    python bench/arena_load.py [--raters 50] [--judgments 20] [--backends sqlite postgres]

Each rater opens the page, then asks for a pair and judges it, M times. Reported per backend:
judgments acknowledged, lost (acknowledged but not in the database) and duplicated, judgments/s
and the p50 / p95 latency of a judgment request. The tests use the same pieces
(tests/test_arena_server.py). Compare mode, so no model runs: the figures are the app's and the
database's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: Path, port: int, log: Path) -> subprocess.Popen:
    """``pickalign arena --config CONFIG --port PORT`` in its own process, once it answers."""
    import httpx

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pickalign.cli",
            "arena",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the arena server exited: {log.read_text()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/admin/stats", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the arena server did not answer within 60 s")


class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback (Debian's package; run as the postgres user
    when this process is root, as initdb refuses root)."""

    def __init__(self):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            raise FileNotFoundError("PostgreSQL is not installed: apt-get install postgresql")
        self.bin = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="arena-pg-"))
        self.port = free_port()
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(self.dir, "postgres")

    def run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=120)

    def __enter__(self) -> str:
        data = self.dir / "data"
        self.run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self.run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(self.dir / "log"),
            "start",
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def __exit__(self, *exc) -> None:
        try:
            self.run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def rater(base: str, judgments: int, acknowledged: list, latencies: list, errors: list) -> None:
    """One rater: the page, then ``judgments`` times a pair and its judgment. Stops at the first
    error (a killed server)."""
    import httpx

    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            page = client.get("/")
            headers = {
                "X-CSRF-Token": re.search(r'name="csrf" content="([0-9a-f]+)"', page.text)[1]
            }
            for _ in range(judgments):
                pair = client.post("/api/pair", json={}, headers=headers)
                pair.raise_for_status()
                pair = pair.json()
                uid = uuid.uuid4().hex
                body = {"uid": uid, "pair": pair["pair"], "choice": "left", "latency_ms": 800}
                started = time.perf_counter()
                answer = client.post("/api/judge", json=body, headers=headers)
                answer.raise_for_status()
                latencies.append(time.perf_counter() - started)
                acknowledged.append(uid)  # a success response: the judgment must be stored
    except Exception as error:  # noqa: BLE001 - recorded, the caller decides
        errors.append(repr(error))


def run_load(base: str, raters: int, judgments: int) -> dict:
    acknowledged, latencies, errors = [], [], []
    threads = [
        threading.Thread(target=rater, args=(base, judgments, acknowledged, latencies, errors))
        for _ in range(raters)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "acknowledged": acknowledged,
        "errors": errors,
        "seconds": seconds,
        "judgments_per_s": len(acknowledged) / seconds,
        "p50_ms": 1000 * ordered[len(ordered) // 2] if ordered else None,
        "p95_ms": 1000 * ordered[int(len(ordered) * 0.95)] if ordered else None,
    }


def stored_uids(database: str) -> list[str]:
    """Every judgment uid in the database, duplicates included."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from pickalign.eval.arena.store import JudgmentRow, open_engine

    with Session(open_engine(database)) as session:
        return list(session.scalars(select(JudgmentRow.uid)))


def write_arena_config(folder: Path, evaluation: Path, database: str, per_minute: int) -> Path:
    import yaml

    config = {
        "mode": "compare",
        "evaluation": str(evaluation),
        "database": database,
        "images_dir": str(folder / "images"),
        "judgments_per_minute": per_minute,
    }
    path = folder / "arena.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure(backend: str, evaluation: Path, raters: int, judgments: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"arena-load-{backend}-"))
    postgres = PostgresServer() if backend == "postgres" else None
    database = postgres.__enter__() if postgres else f"sqlite:///{folder / 'arena.db'}"
    try:
        config = write_arena_config(folder, evaluation, database, per_minute=10 * judgments)
        port = free_port()
        server = start_server(config, port, folder / "server.log")
        try:
            result = run_load(f"http://127.0.0.1:{port}", raters, judgments)
        finally:
            server.terminate()
            server.wait(30)
        stored = stored_uids(database)
        result["lost"] = len(set(result["acknowledged"]) - set(stored))
        result["duplicated"] = len(stored) - len(set(stored))
        result["stored"] = len(stored)
        return result
    finally:
        if postgres:
            postgres.__exit__(None, None, None)
        shutil.rmtree(folder, ignore_errors=True)


def tiny_evaluation(folder: Path) -> Path:
    """A small evaluation of two toy models to draw compare-mode pairs from."""
    from pickalign.eval.generate import ModelSpec
    from pickalign.eval.suite import EvalConfig, evaluate

    config = EvalConfig(
        models=[ModelSpec("sd", "eval/toy/assets/sd"), ModelSpec("sdxl", "eval/toy/assets/sdxl")],
        scorers={"oracle": "toy-oracle"},
        prompts="toy:validation",
        max_prompts=20,
        steps=10,
        output_dir=str(folder),
        grid_prompts=0,
    )
    return evaluate(config, progress=False).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raters", type=int, default=50)
    parser.add_argument("--judgments", type=int, default=20)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--evaluation", help="an evaluation folder (default: a small toy one)")
    args = parser.parse_args()
    evaluation = Path(args.evaluation or tiny_evaluation(REPO / "outputs" / "arena_load_eval"))
    for backend in args.backends:
        result = measure(backend, evaluation, args.raters, args.judgments)
        summary = {k: v for k, v in result.items() if k not in ("acknowledged", "errors")}
        summary |= {"acknowledged": len(result["acknowledged"]), "errors": len(result["errors"])}
        print(backend, json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
