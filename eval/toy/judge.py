"""Judging image sets with the toy world's oracle: adherence of each set and the win rate of
one set over another on the same prompts and seeds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pickalign.config import check_fields
from pickalign.eval.winrate import win_rate
from pickalign.reward.toyworld import (
    ATTRIBUTE_NAMES,
    adherence,
    all_attributes,
    judge,
    read_image,
    render,
)
from pickalign.runtime import atomic_write_json


def held_out_split(split: str) -> str:
    """``split`` when it is one the toy bases never trained on."""
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    return split


def sample_held_out(
    pipe,
    split: str = "test",
    prompts: int = 200,
    seeds_per_prompt: int = 1,
    steps: int = 20,
    guidance_scale: float = 5.0,
    first_seed: int = 0,
    conditioning=None,
    progress: bool = False,
) -> tuple[list[str], list[Image.Image]]:
    """The one way the toy world samples a model on held-out prompts: the first ``prompts``
    prompts of ``split`` ("test" for figures, "validation" for choices), seed
    ``first_seed + k * seeds_per_prompt + j`` for prompt k, so every model compared sees the same
    noise. Returns the prompt of each image and the images. ``conditioning``: embeddings to
    sample with instead of the pipeline's own encoding (``pickalign.align.sampler.generate``)."""
    from pickalign.align.sampler import generate
    from pickalign.reward.toyworld import prompt_splits

    held_out = prompt_splits()[held_out_split(split)][:prompts]
    texts = [a.prompt for a in held_out for _ in range(seeds_per_prompt)]
    seeds = list(range(first_seed, first_seed + len(texts)))
    images = generate(
        pipe, texts, seeds, steps, guidance_scale, progress=progress, conditioning=conditioning
    )
    return texts, images


def judged_adherence(texts: list[str], images: list[Image.Image]) -> dict:
    """The oracle's adherence figures of images answering ``texts``."""
    return adherence([judge(text, image) for text, image in zip(texts, images)])


def oracle_compare(
    prompts: list[str], images_a: list[Image.Image], images_b: list[Image.Image], seed: int = 0
) -> dict:
    """Win rate of A over B by the oracle's attribute counts (ties 0.5), with a bootstrap 95%
    interval (resampling prompts, so several seeds of one prompt count as one draw), each set's
    adherence, and per attribute how many images A gets right where B got it wrong ("fixed") and
    the reverse ("broken"). ``images_a[i]`` and ``images_b[i]`` answer ``prompts[i]``."""
    if not len(prompts) == len(images_a) == len(images_b):
        raise ValueError(f"{len(prompts)} prompts, {len(images_a)} and {len(images_b)} images")
    verdicts_a = [judge(p, image) for p, image in zip(prompts, images_a)]
    verdicts_b = [judge(p, image) for p, image in zip(prompts, images_b)]
    rate = win_rate(
        [v.score for v in verdicts_a], [v.score for v in verdicts_b], seed=seed, groups=prompts
    )
    return {
        "win_rate": rate,
        "a": adherence(verdicts_a),
        "b": adherence(verdicts_b),
        "changes": attribute_changes(verdicts_a, verdicts_b),
    }


def attribute_changes(verdicts_a, verdicts_b) -> dict[str, dict[str, int]]:
    """Per attribute, on the same prompts and seeds: ``fixed`` counts images A gets right and B
    wrong, ``broken`` the reverse. The win rate only sees the net; a fine-tune that fixes 70
    backgrounds and breaks 40 shows up here."""
    changes = {}
    for name in ATTRIBUTE_NAMES:
        pairs = [(a.satisfied[name], b.satisfied[name]) for a, b in zip(verdicts_a, verdicts_b)]
        changes[name] = {
            "fixed": sum(a and not b for a, b in pairs),
            "broken": sum(b and not a for a, b in pairs),
        }
    return changes


def oracle_accuracy(renders: int = 1000, seed: int = 0, transform=None) -> dict:
    """How often the oracle reads every attribute of a fresh render right; ``transform`` (e.g. a
    VAE round trip) is applied to each render first. Returns overall and per-attribute figures
    and the most common confusions."""
    rng = np.random.default_rng(seed)
    combos = all_attributes()
    truth = [combos[i] for i in rng.integers(len(combos), size=renders)]
    images = [render(a, rng) for a in truth]
    if transform is not None:
        images = transform(images)
    read = [read_image(image) for image in images]
    confusions = Counter()
    per_attribute = dict.fromkeys(ATTRIBUTE_NAMES, 0)
    for wanted, seen in zip(truth, read):
        seen_values = seen.as_tuple() if seen else (None,) * 3
        for name, w, s in zip(ATTRIBUTE_NAMES, wanted.as_tuple(), seen_values):
            per_attribute[name] += w == s
            if w != s:
                confusions[f"{name}: {w} -> {s}"] += 1
    return {
        "renders": renders,
        "all_correct": sum(t == r for t, r in zip(truth, read)) / renders,
        **{name: count / renders for name, count in per_attribute.items()},
        "confusions": dict(confusions.most_common(5)),
    }


def aligned_vs_base(
    base: str | Path,
    aligned: str | Path | list[str | Path],
    prompts: int = 200,
    seeds_per_prompt: int = 1,
    steps: int = 20,
    guidance_scale: float = 5.0,
    device: str | None = None,
    split: str = "test",
    reward: str | None = None,
) -> dict | list[dict]:
    """Oracle win rate of an aligned model over its base on held-out toy prompts, same seeds.

    Sampling runs on ``device`` (default: the GPU when there is one). Seeds make the same noise
    on one kind of device; a GPU run's images differ from a CPU run's.

    ``aligned`` is a folder with ``pytorch_lora_weights.safetensors`` (loaded with
    ``pickalign.align.lora.load_lora``) or a ``unet`` subfolder (full fine-tuning), or a list of such
    folders (say, a run's checkpoints): the base is then sampled once and a list of reports, one
    per folder, comes back. Prompt k of ``split`` ("test" for reported figures, "validation" for
    choosing settings) is sampled with seeds k * seeds_per_prompt + j for every model.
    ``reward`` (a spec for ``pickalign.reward.registry.load_reward``, say the run's learned reward) also
    scores both image sets: its mean on base and aligned, beside the oracle's verdict.
    """
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from pickalign.align.lora import WEIGHT_NAME, load_lora

    held_out_split(split)
    folders = [Path(aligned)] if isinstance(aligned, (str, Path)) else [Path(a) for a in aligned]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DiffusionPipeline.from_pretrained(base).to(device)
    sampling = (split, prompts, seeds_per_prompt, steps, guidance_scale)
    texts, base_images = sample_held_out(pipe, *sampling, progress=True)
    base_unet, reports = pipe.unet, []
    scorer = None
    if reward:
        from pickalign.reward.registry import load_reward

        scorer = load_reward(reward, device)
        base_reward = float(scorer.score(texts, base_images).mean())
    for folder in folders:
        lora = (folder / WEIGHT_NAME).exists()
        if lora:
            load_lora(pipe, folder)
        else:
            pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device)
        _, aligned_images = sample_held_out(pipe, *sampling, progress=True)
        if lora:  # back to the base for the next folder
            pipe.unload_lora_weights()
        else:
            pipe.unet = base_unet
        result = oracle_compare(texts, aligned_images, base_images)
        if scorer is not None:
            result["reward"] = {
                "name": reward,
                "base": base_reward,
                "aligned": float(scorer.score(texts, aligned_images).mean()),
            }
        reports.append(
            {
                "aligned_folder": str(folder),
                "win_rate": result["win_rate"].as_dict(),
                "aligned": result["a"],
                "base": result["b"],
                "changes": result["changes"],
                "prompts": len(texts) // seeds_per_prompt,
                "split": split,
                "seeds_per_prompt": seeds_per_prompt,
                "sampling": {"steps": steps, "guidance_scale": guidance_scale, "device": device},
                **({"reward": result["reward"]} if "reward" in result else {}),
            }
        )
    return reports if isinstance(aligned, list) else reports[0]


def ranking_vs_single(
    base: str | Path,
    reward: str = "pickscore:eval/toy/assets/pickscore",
    n: int = 8,
    prompts: int = 200,
    split: str = "test",
    steps: int = 20,
    guidance_scale: float = 5.0,
    lora: str | Path | None = None,
) -> dict:
    """Best-of-n ranking in the toy world: for each held-out prompt, n candidates (seeds 0..n-1)
    ranked by ``reward`` (``pickalign.align.rank.best_of_n``); the oracle's win rate of the best candidate
    over candidate 0 (the one sample a user would otherwise get), and of the oracle's own best
    of the same candidates over candidate 0 (the ceiling of ranking)."""
    from diffusers import DiffusionPipeline

    from pickalign.align.lora import load_lora
    from pickalign.align.models import parts_from_pipeline
    from pickalign.align.rank import best_of_n
    from pickalign.reward.registry import load_reward
    from pickalign.reward.toyworld import prompt_splits

    texts = [a.prompt for a in prompt_splits()[held_out_split(split)][:prompts]]
    pipe = DiffusionPipeline.from_pretrained(base)
    if lora:
        load_lora(pipe, lora)
    ranked = best_of_n(
        parts_from_pipeline(pipe),
        texts,
        load_reward(reward),
        n,
        0,
        None,
        steps,
        guidance_scale,
        batch_size=64,
    )
    single, by_reward, by_oracle = [], [], []
    for prompt, (candidates, images) in zip(texts, ranked):
        first = next(i for i, c in enumerate(candidates) if c.seed == 0)
        single.append(images[first])
        by_reward.append(images[0])
        verdicts = [judge(prompt, image).score for image in images]
        by_oracle.append(images[max(range(n), key=lambda i: (verdicts[i], -i))])
    reward_report = oracle_compare(texts, by_reward, single)
    oracle_report = oracle_compare(texts, by_oracle, single)
    return {
        "base": str(base),
        "lora": str(lora) if lora else None,
        "reward": reward,
        "n": n,
        "prompts": len(texts),
        "split": split,
        "single": reward_report["b"],
        "best_by_reward": reward_report["a"],
        "best_by_oracle": oracle_report["a"],
        "win_rate_by_reward": reward_report["win_rate"].as_dict(),
        "win_rate_by_oracle": oracle_report["win_rate"].as_dict(),
        "sampling": {"steps": steps, "guidance_scale": guidance_scale},
    }


@dataclass
class ToyJudgeConfig:
    """Toy world: judge an alignment run's final model against its base with the oracle. It sits
    beside a method's config in the toy recipes' YAML (``toy_eval_*`` keys)."""

    toy_eval_prompts: int = field(
        default=0,
        metadata={
            "range": ">= 0",
            "help": "Judge on this many held-out prompts at the end (0: off).",
        },
    )
    toy_eval_seeds: int = field(default=1, metadata={"range": "> 0", "help": "Seeds per prompt."})
    toy_eval_split: str = field(
        default="test",
        metadata={
            "choices": ("test", "validation"),
            "help": "Judge on 'test' prompts (figures), or 'validation' (choosing settings).",
        },
    )
    toy_eval_steps: int = field(default=20, metadata={"range": "> 0", "help": "Sampling steps."})
    toy_eval_guidance: float = field(default=5.0, metadata={"range": ">= 1", "help": "Guidance."})
    toy_eval_reward: str | None = field(
        default=None,
        metadata={
            "help": "Also score base and aligned samples with this reward (e.g. the run's "
            "learned reward), to see it beside the oracle."
        },
    )

    def __post_init__(self):
        check_fields(self)


def recipe_config(config_type, argv: list[str]):
    """A recipe's ``(config, ToyJudgeConfig)``. The toy judging settings join the parser only
    when the run names one (a ``toy_eval_*`` key in its YAML or on the command line), so a
    production run's ``--help`` and config know nothing of them; otherwise judging is off."""
    from pickalign.config import parse_config

    if _names_toy_judging(argv):
        return parse_config((config_type, ToyJudgeConfig), argv)
    return parse_config(config_type, argv), ToyJudgeConfig()


def _names_toy_judging(argv: list[str]) -> bool:
    flags = [arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")]
    if any(flag.startswith("toy_eval_") for flag in flags):
        return True
    for i, arg in enumerate(argv):
        path = arg.partition("=")[2] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path and Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text())
            return isinstance(data, dict) and any(str(k).startswith("toy_eval_") for k in data)
    return False


def judge_toy_run(base: str | Path, final: str | Path, judge: ToyJudgeConfig) -> dict | None:
    """After a toy alignment run: when ``judge.toy_eval_prompts`` is set, judge the aligned model
    in ``final`` against its ``base`` on the main process (as accelerate knows it), print the win
    rate and write the report to ``toy_eval.json`` in the run folder, beside ``final/`` (a
    published folder is never modified)."""
    from accelerate import PartialState

    if not judge.toy_eval_prompts or not PartialState().is_main_process:
        return None
    final = Path(final)
    report = aligned_vs_base(
        base,
        final,
        judge.toy_eval_prompts,
        judge.toy_eval_seeds,
        judge.toy_eval_steps,
        judge.toy_eval_guidance,
        split=judge.toy_eval_split,
        reward=judge.toy_eval_reward,
    )
    rate, changes = report["win_rate"], report["changes"]
    line = (
        f"toy world: oracle win rate over the base {rate['estimate']:.3f} "
        f"[95% CI {rate['low']:.3f}, {rate['high']:.3f}] on {report['prompts']} held-out "
        f"{report['split']} prompts x {report['seeds_per_prompt']} seeds; all attributes right "
        f"{report['base']['all_correct']:.3f} -> {report['aligned']['all_correct']:.3f}; "
        "fixed / broken "
        + ", ".join(f"{k} {v['fixed']} / {v['broken']}" for k, v in changes.items())
    )
    if "reward" in report:
        scores = report["reward"]
        line += f"; mean {scores['name']} {scores['base']:.3f} -> {scores['aligned']:.3f}"
    atomic_write_json(final.parent / "toy_eval.json", {**report, "summary": line})
    print(line)
    return report
