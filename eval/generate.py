"""Images of every evaluated model on the same prompts and seeds, resumable and spread over
processes.

Item k is prompt ``k // seeds_per_prompt`` with seed ``first_seed + k``: every model sees the
same noise for the same item, so per-item comparisons are paired. A ranked model (best-of-n by a
reward) samples n candidates for item k, candidate 0 from the item's own seed (the plain
sample) and candidate c from ``seed + c * CANDIDATE_SEED_STRIDE``, and keeps the best.

Process r of w takes items r, r + w, ... Each written image is recorded in
``generation/rank<r>.jsonl`` (appended once the image is on disk) with what it was made with
(``generation_settings``: pipeline, LoRA, steps, guidance, size, ranking) and when; a rerun skips
the items whose newest record, whichever process wrote it, has the same prompt, seed and settings
and whose image is on disk. ``manifest.jsonl`` lists every image (model, index, prompt, seed,
path, and the candidates of a ranked one).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pickalign.config import ConfigError, check_fields
from pickalign.runtime import atomic_path

CANDIDATE_SEED_STRIDE = 1_000_003
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LOG_ONLY = ("process", "seconds", "settings", "written")  # in the logs, not the manifest


@dataclass
class ModelSpec:
    """One evaluated model: a pipeline, optionally a LoRA, optionally best-of-n ranking."""

    name: str = field(metadata={"help": "Short name: a column of the report, a folder name."})
    model: str = field(metadata={"help": "A diffusers pipeline: Hub id or local folder."})
    lora: str | None = field(
        default=None, metadata={"help": "A LoRA folder (pytorch_lora_weights.safetensors)."}
    )
    lora_scale: float = field(default=1.0, metadata={"help": "The LoRA's weight.", "range": ">= 0"})
    rank_by: str | None = field(
        default=None,
        metadata={"help": "Best-of-n by this reward (pickscore[:MODEL], module:function, ...)."},
    )
    rank_n: int = field(default=8, metadata={"help": "Candidates per item.", "range": ">= 1"})
    steps: int | None = field(
        default=None, metadata={"help": "DDIM steps (default: the suite's).", "range": ">= 1"}
    )
    guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance (default: the suite's).", "range": ">= 0"}
    )

    def __post_init__(self):
        check_fields(self)
        if not self.name[:1].isalnum() or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(
                f"models: name {self.name!r} must be letters, digits, '-', '_' or '.', starting "
                "with a letter or digit (it names a folder)"
            )


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    seed: int


def make_items(prompts: list[str], seeds_per_prompt: int, first_seed: int) -> list[Item]:
    """Item k: prompt ``k // seeds_per_prompt``, seed ``first_seed + k`` (the toy judge's seeds)."""
    return [
        Item(k, prompt, first_seed + k)
        for k, prompt in enumerate(p for p in prompts for _ in range(seeds_per_prompt))
    ]


def image_path(name: str, index: int) -> str:
    """Where item ``index`` of model ``name`` lives, relative to the evaluation folder."""
    return f"images/{name}/{index:05d}.png"


def read_records(out: Path) -> dict[tuple[str, int], dict]:
    """Every generation record of every process, the newest per (model, index): the one that
    describes the image on disk (logs of earlier runs with other process counts included)."""
    records = {}
    for log in sorted((out / "generation").glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: its image is redone
                    continue
                key = (record["model"], record["index"])
                if key not in records or record.get("written", 0) >= records[key].get("written", 0):
                    records[key] = record
    return records


def generation_settings(spec: ModelSpec, steps: int, guidance: float, size: int | None) -> dict:
    """What an image of ``spec`` depends on besides its prompt and seed: an image made with
    other settings (another pipeline, LoRA or retrained LoRA, steps, guidance, size, ranking)
    is made again."""
    settings = {"model": spec.model, "lora": spec.lora, "lora_scale": spec.lora_scale}
    if spec.lora and (Path(spec.lora) / LORA_WEIGHTS).exists():
        settings["lora_modified"] = (Path(spec.lora) / LORA_WEIGHTS).stat().st_mtime_ns
    if spec.rank_by:
        settings |= {"rank_by": spec.rank_by, "rank_n": spec.rank_n}
    return settings | {"steps": steps, "guidance": guidance, "size": size}


def _append(log: Path, record: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _finished(record: dict | None, item: Item, out: Path, settings: dict | None = None) -> bool:
    """Whether ``record`` is this item's (same prompt and seed, and ``settings`` when given) and
    its image is on disk."""
    return (
        record is not None
        and (record["prompt"], record["seed"]) == (item.prompt, item.seed)
        and (settings is None or record.get("settings") == settings)
        and (out / record["path"]).exists()
    )


def load_pipeline(spec: ModelSpec, device):
    from diffusers import DiffusionPipeline

    from pickalign.align.lora import load_lora
    from pickalign.reward.sources import require

    require(spec.model, "pipeline", f"models[{spec.name}].model")
    pipe = DiffusionPipeline.from_pretrained(spec.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    if spec.lora:
        require(spec.lora, "lora", f"models[{spec.name}].lora")
        load_lora(pipe, spec.lora, adapter_name=spec.name)
        # fused into the weights at its scale, the adapter layers removed: sampling then costs
        # what the base costs (the fused images match the adapter's to a pixel level)
        pipe.fuse_lora(lora_scale=spec.lora_scale, adapter_names=[spec.name])
        pipe.unload_lora_weights()
    return pipe


def _best_of_n(parts, items: list[Item], spec: ModelSpec, reward, steps, guidance, size):
    """(best image, candidates [{seed, score}] best first) per item."""
    from pickalign.align.sampler import generate

    n = spec.rank_n
    prompts = [item.prompt for item in items for _ in range(n)]
    seeds = [item.seed + c * CANDIDATE_SEED_STRIDE for item in items for c in range(n)]
    images = generate(parts, prompts, seeds, steps, guidance, size, batch_size=len(prompts))
    scores = torch.as_tensor(reward.score(prompts, images)).float().view(len(items), n)
    results = []
    for i in range(len(items)):
        order = torch.argsort(scores[i], descending=True, stable=True).tolist()
        candidates = [{"seed": seeds[i * n + c], "score": float(scores[i, c])} for c in order]
        results.append((images[i * n + order[0]], candidates))
    return results


def generate_model(
    spec: ModelSpec,
    items: list[Item],
    out: Path,
    state,
    steps: int,
    guidance: float,
    size: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Write this process's missing images of ``spec`` (see the module docstring). ``state``:
    an ``accelerate.PartialState``. Returns {"written", "skipped", "seconds"} for this process."""
    from tqdm.auto import tqdm

    from pickalign.align.models import parts_from_pipeline
    from pickalign.align.sampler import generate
    from pickalign.reward.registry import load_reward

    started = time.perf_counter()
    steps = spec.steps or steps
    guidance = spec.guidance_scale if spec.guidance_scale is not None else guidance
    done = read_records(out)
    settings = json.loads(json.dumps(generation_settings(spec, steps, guidance, size)))
    mine = items[state.process_index :: state.num_processes]
    todo = [
        item
        for item in mine
        if not _finished(done.get((spec.name, item.index)), item, out, settings)
    ]
    figures = {"written": 0, "skipped": len(mine) - len(todo)}
    if todo:
        pipe = load_pipeline(spec, state.device)
        parts = parts_from_pipeline(pipe)
        reward = load_reward(spec.rank_by, state.device) if spec.rank_by else None
        log = out / "generation" / f"rank{state.process_index}.jsonl"
        per_batch = max(1, batch_size // spec.rank_n) if reward else batch_size
        bar = tqdm(
            total=len(todo),
            desc=f"{spec.name} (process {state.process_index})",
            disable=not progress,
        )
        for start in range(0, len(todo), per_batch):
            batch_started = time.perf_counter()
            batch = todo[start : start + per_batch]
            if reward is None:
                prompts, seeds = [i.prompt for i in batch], [i.seed for i in batch]
                images = generate(parts, prompts, seeds, steps, guidance, size, len(batch))
                results = [(image, None) for image in images]
            else:
                results = _best_of_n(parts, batch, spec, reward, steps, guidance, size)
            for item, (image, candidates) in zip(batch, results):
                path = image_path(spec.name, item.index)
                with atomic_path(out / path) as tmp:
                    image.save(tmp, format="PNG")
                record = {"model": spec.name, **asdict(item), "path": path, "settings": settings}
                record["written"] = time.time()
                record["seconds"] = round((time.perf_counter() - batch_started) / len(batch), 4)
                if candidates is not None:
                    record |= {"ranked_by": spec.rank_by, "candidates": candidates}
                _append(log, record | {"process": state.process_index})
            figures["written"] += len(batch)
            bar.update(len(batch))
        bar.close()
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def write_manifest(out: Path, models: list[ModelSpec], items: list[Item]) -> list[dict]:
    """``manifest.jsonl``: one row per (model, item) in model then item order, from the
    records; an image without one is an error (its generation did not finish)."""
    records = read_records(out)
    rows = []
    for spec in models:
        for item in items:
            record = records.get((spec.name, item.index))
            if not _finished(record, item, out):
                raise RuntimeError(
                    f"{spec.name}: item {item.index} has no image; rerun to finish generation"
                )
            rows.append({k: v for k, v in record.items() if k not in LOG_ONLY})
    text = "".join(json.dumps(row) + "\n" for row in rows)
    with atomic_path(out / "manifest.jsonl") as tmp:
        tmp.write_text(text)
    return rows
