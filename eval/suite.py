"""Evaluate models on a prompt set: generate (paired seeds, resumable, over processes), score,
compare, and write ``results.json`` and ``report.html``.

    pickalign eval --config recipes/configs/eval/toy.yaml
    accelerate launch recipes/evaluate.py --config recipes/configs/eval/pickapic_test_unique.yaml

The config is YAML (``EvalConfig`` below, read by ``pickalign.config.parse_config``; ``--help``
lists every field); ``--FIELD VALUE`` on the command line overrides a top-level field.
``models`` is a list of ``pickalign.eval.generate.ModelSpec``, ``scorers`` maps a column name to
a reward spec (``pickalign.reward.registry.load_reward``), ``runs`` maps a name to a training
run folder whose curves the report draws.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pickalign.config import ConfigError, check_fields
from pickalign.eval.generate import (
    ModelSpec,
    generate_model,
    make_items,
    read_records,
    write_manifest,
)
from pickalign.runtime import atomic_write_json, check_world


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts, scored how (see the module docstring)."""

    models: list[ModelSpec] = field(
        metadata={"help": "The models, each {name, model, lora, lora_scale, rank_by, rank_n, ...}."}
    )
    scorers: dict[str, str] = field(
        metadata={
            "help": "Column name -> scorer: pickscore[:MODEL], clip[:MODEL], "
            "aesthetic:WEIGHTS[:CLIP], toy-oracle or module:function."
        }
    )
    prompts: str = field(
        default="toy:test",
        metadata={
            "help": "Prompt set: DATASET[:SPLIT] (Pick-a-Pic captions), a .txt/.csv/.tsv/.jsonl/"
            ".json/.parquet file (FILE:COLUMN), or toy[:SPLIT]."
        },
    )
    max_prompts: int | None = field(
        default=None, metadata={"help": "Only the first N prompts.", "range": ">= 1"}
    )
    seeds_per_prompt: int = field(
        default=1, metadata={"help": "Images per prompt and model.", "range": ">= 1"}
    )
    seed: int = field(default=0, metadata={"help": "Item k gets seed SEED + k.", "range": ">= 0"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Images, results, report."})
    steps: int = field(default=50, metadata={"help": "DDIM steps (eta 0).", "range": ">= 1"})
    guidance_scale: float = field(
        default=5.0, metadata={"help": "Classifier-free guidance.", "range": ">= 0"}
    )
    size: int | None = field(
        default=None, metadata={"help": "Image size (default: the model's).", "range": ">= 8"}
    )
    batch_size: int = field(
        default=32, metadata={"help": "Images per sampling batch.", "range": ">= 1"}
    )
    grid_prompts: int = field(
        default=16, metadata={"help": "Items shown in the report's image grid.", "range": ">= 0"}
    )
    runs: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Name -> training run folder: its curves go in the report."},
    )
    human_judgments: str | None = field(
        default=None,
        metadata={
            "help": "Table of judgments (prompt, image_0, image_1, label_0): human win rates."
        },
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "With reward_data: its accuracy by the Pick-a-Pic protocol."},
    )
    reward_data: str | None = field(
        default=None,
        metadata={"help": "Pick-a-Pic dataset (validation_unique, test_unique) for reward_model."},
    )
    title: str = field(default="pickalign evaluation", metadata={"help": "The report's title."})
    notes: str = field(default="", metadata={"help": "A paragraph shown under the title."})

    def __post_init__(self):
        check_fields(self)
        self.models = [m if isinstance(m, ModelSpec) else _model_spec(m) for m in self.models]
        names = [m.name for m in self.models]
        if not names:
            raise ConfigError("models: give at least one model")
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names must differ, got {names}")
        if not self.scorers:
            raise ConfigError("scorers: give at least one, e.g. {pickscore: pickscore}")
        if (self.reward_model is None) != (self.reward_data is None):
            raise ConfigError("reward_model and reward_data go together")


def _model_spec(entry) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"models: each entry is a mapping with name and model, got {entry!r}")
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"models: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in ("name", "model") if k not in entry]
    if missing:
        raise ConfigError(f"models: entry {entry} lacks {', '.join(missing)}")
    return ModelSpec(**entry)


def _state():
    """The process state of an ``accelerate launch`` (or a plain run): gloo on a CPU."""
    import os

    import torch
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs = {"backend": "gloo"} if on_cpu and world > 1 else {}
    state = PartialState(cpu=on_cpu, **kwargs)
    check_world(state)
    return state


def score_images(out: Path, manifest: list[dict], scorers: dict[str, str], device) -> dict:
    """``scores[model][scorer]``: per-item scores, items in manifest order. The scorers load
    once and each image is decoded once for all of them."""
    from tqdm.auto import tqdm

    from pickalign.reward.data import decode_image
    from pickalign.reward.registry import load_reward

    loaded = {name: load_reward(spec, device) for name, spec in scorers.items()}
    models = list(dict.fromkeys(row["model"] for row in manifest))
    scores: dict[str, dict[str, np.ndarray]] = {}
    for model in models:
        rows = [row for row in manifest if row["model"] == model]
        values: dict[str, list[float]] = {name: [] for name in loaded}
        for start in tqdm(range(0, len(rows), 64), desc=f"scoring {model}", leave=False):
            chunk = rows[start : start + 64]
            images = [decode_image(out / row["path"]) for row in chunk]
            for name, scorer in loaded.items():
                values[name] += scorer.score([row["prompt"] for row in chunk], images).tolist()
        scores[model] = {name: np.asarray(v, dtype=float) for name, v in values.items()}
    return scores


def evaluate(config: EvalConfig, progress: bool = True) -> Path | None:
    """Generate, score, compare; write ``results.json`` and ``report.html`` in ``output_dir``.
    Returns the report's path on the main process, None on the others."""
    from pickalign.align.prompts import load_prompts
    from pickalign.eval.report import write_report
    from pickalign.eval.results import human_win_rates, read_table, score_figures, training_curves

    started = time.perf_counter()
    state = _state()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(config.prompts, config.max_prompts)
    items = make_items(prompts, config.seeds_per_prompt, config.seed)
    generation = {}
    for spec in config.models:
        generation[spec.name] = generate_model(
            spec,
            items,
            out,
            state,
            config.steps,
            config.guidance_scale,
            config.size,
            config.batch_size,
            progress=progress,
        )
        state.wait_for_everyone()
    if not state.is_main_process:
        return None
    manifest = write_manifest(out, config.models, items)
    scoring_started = time.perf_counter()
    scores = score_images(out, manifest, config.scorers, state.device)
    item_prompts = [item.prompt for item in items]
    results = {
        "title": config.title,
        "notes": config.notes,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config),
        "prompts": {"source": config.prompts, "count": len(prompts), "items": len(items)},
        "processes": state.num_processes,
        "model_names": [spec.name for spec in config.models],
        "scorer_names": list(config.scorers),  # the config's order (the JSON's keys are sorted)
        **score_figures(scores, item_prompts),
        "images": [
            {
                **row,
                "scores": {
                    s: float(scores[row["model"]][s][row["index"]]) for s in scores[row["model"]]
                },
            }
            for row in manifest
        ],
        "human": None,
        "reward_accuracy": None,
        "curves": {name: training_curves(folder) for name, folder in config.runs.items()},
    }
    if config.human_judgments:
        results["human"] = human_win_rates(read_table(config.human_judgments), manifest)
    if config.reward_model:
        from pickalign.reward.evaluate import evaluate_reward
        from pickalign.reward.pickscore import PickScore

        scorer = PickScore.from_pretrained(config.reward_model, device=state.device)
        results["reward_accuracy"] = {
            "model": config.reward_model,
            "data": config.reward_data,
            **evaluate_reward(scorer, config.reward_data),
        }
    records = read_records(out)
    results["seconds"] = {
        # sampling time of each model's images, summed over processes and over the runs that
        # made them (a resumed evaluation counts the earlier run's share too)
        "generation": {
            spec.name: round(
                sum(records[(spec.name, item.index)].get("seconds", 0.0) for item in items), 1
            )
            for spec in config.models
        },
        "this_run": {name: figures["seconds"] for name, figures in generation.items()},
        "scoring": round(time.perf_counter() - scoring_started, 1),
        "total": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / "results.json", results)
    return write_report(results, out)
