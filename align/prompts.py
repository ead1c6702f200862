"""Prompts for sampling (online alignment, ranking, monitoring), named by one string:

- ``toy`` or ``toy:<split>``: the toy world's prompts (``train`` by default; ``validation``,
  ``test``);
- a ``.txt`` file: one prompt per line (blank lines skipped);
- a table, ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` (a list of rows or of strings, or columns) or
  ``.parquet``, with a ``caption`` or ``prompt`` column (also ``prompts``, ``text``, any case;
  ``FILE:COLUMN`` names another): PartiPrompts' tsv, DrawBench's csv, HPDv2's json;
- a Pick-a-Pic dataset, a Hub id or a local folder, with ``:<split>`` (default ``train``): its
  captions, read without decoding an image.

Prompts come back de-duplicated in their first order, empty and whitespace-only ones dropped.
"""

from __future__ import annotations

import json
from pathlib import Path


def _unique(prompts) -> list[str]:
    return list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))


def _split(spec: str, default: str) -> tuple[str, str]:
    source, _, split = spec.partition(":")
    return source, split or default


TABLES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
PROMPT_COLUMNS = ("caption", "prompt", "prompts", "text")


def _table_prompts(spec: str) -> list[str]:
    """The prompt column of a table file ``spec`` (``FILE`` or ``FILE:COLUMN``)."""
    import pandas as pd

    path, column = spec, None
    if not spec.endswith(TABLES) and ":" in spec:
        path, _, column = spec.rpartition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"prompts {spec!r}: no such file")
    suffix = Path(path).suffix
    if suffix == ".parquet":
        table = pd.read_parquet(path)
    elif suffix == ".jsonl":
        table = pd.read_json(path, lines=True)
    elif suffix == ".json":
        rows = json.loads(Path(path).read_text())
        if isinstance(rows, list) and rows and isinstance(rows[0], str):
            rows = {"prompt": rows}
        elif not isinstance(rows, list) and not (
            isinstance(rows, dict) and all(isinstance(v, list) for v in rows.values())
        ):
            raise ValueError(
                f"prompts {spec!r}: expected a list of strings or of rows, or columns as lists"
            )
        table = pd.DataFrame(rows)
    else:
        table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    if column is None:
        by_lower = {str(c).lower(): c for c in table.columns}
        column = next((by_lower[c] for c in PROMPT_COLUMNS if c in by_lower), None)
        if column is None:
            raise ValueError(
                f"prompts {spec!r}: no caption or prompt column (columns: "
                f"{', '.join(map(str, table.columns))}); name one as FILE:COLUMN"
            )
    elif column not in table.columns:
        raise ValueError(
            f"prompts {spec!r}: no column {column!r} (columns: "
            f"{', '.join(map(str, table.columns))})"
        )
    return [p.strip() for p in table[column].tolist() if isinstance(p, str)]


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """The prompts ``spec`` names (see the module docstring), the first ``limit`` of them."""
    if spec == "toy" or spec.startswith("toy:"):
        from pickalign.reward.toyworld import prompt_splits

        _, split = _split(spec, "train")
        splits = prompt_splits()
        if split not in splits:
            raise ValueError(f"prompts {spec!r}: toy splits are {', '.join(splits)}")
        prompts = [a.prompt for a in splits[split]]
    elif spec.endswith(".txt"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"prompts {spec!r}: no such file")
        prompts = _unique(line.strip() for line in path.read_text().splitlines())
    elif spec.endswith(TABLES) or spec.rpartition(":")[0].endswith(TABLES):
        prompts = _table_prompts(spec)
    else:
        from pickalign.reward.data import load_pickapic

        source, split = _split(spec, "train")
        rows = load_pickapic(source, split).select_columns(["caption"])
        prompts = []
        seen = set()
        for row in rows:  # streamed from the Hub: stop reading once there are enough
            caption = row["caption"]
            if isinstance(caption, str) and caption.strip() and caption not in seen:
                seen.add(caption)
                prompts.append(caption)
                if limit is not None and len(prompts) >= limit:
                    break
    prompts = _unique(prompts)[:limit]
    if not prompts:
        raise ValueError(f"prompts {spec!r}: no usable prompt")
    return prompts
