"""Prompts for sampling (online alignment, ranking, monitoring), named by one string:

- ``toy`` or ``toy:<split>``: the toy world's prompts (``train`` by default; ``validation``,
  ``test``);
- a ``.txt`` file: one prompt per line (blank lines skipped);
- a Pick-a-Pic dataset, a Hub id or a local folder, with ``:<split>`` (default ``train``): its
  captions, read without decoding an image.

Prompts come back de-duplicated in their first order, empty and whitespace-only ones dropped.
"""

from __future__ import annotations

from pathlib import Path


def _unique(prompts) -> list[str]:
    return list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))


def _split(spec: str, default: str) -> tuple[str, str]:
    source, _, split = spec.partition(":")
    return source, split or default


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """The prompts ``spec`` names (see the module docstring), the first ``limit`` of them."""
    if spec == "toy" or spec.startswith("toy:"):
        from reward.toyworld import prompt_splits

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
    else:
        from reward.data import load_pickapic

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
