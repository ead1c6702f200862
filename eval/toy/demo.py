"""``make demo``: the whole pickalign loop on the toy world, on a CPU, in a few minutes.

1. A toy Pick-a-Pic dataset (renders and the toy-sdxl base's own samples, labelled by the
   oracle), read back through the data layer.
2. The reward: the shipped toy PickScore (``eval/toy/assets/pickscore``: the toy CLIP,
   ``eval/toy/assets/clip``, fine-tuned by ``recipes/configs/reward/toy.yaml``); its accuracy on
   the dataset's test_unique pairs.
3. Diffusion-DPO on those pairs: a LoRA on toy-sdxl (``recipes/configs/dpo/toy_sdxl.yaml``,
   shortened).
4. Online best-of-n distillation with the toy PickScore in the loop
   (``recipes/configs/reward_weighted/toy_sdxl_best_of_n.yaml``, shortened).
5. The evaluation report (``pickalign.eval.suite``): base, DPO, online and best-of-4 ranking of the base
   on held-out prompts, scored by the toy PickScore, the toy CLIP's CLIP score and the oracle.

Every stage keeps its output under ``--out``; a rerun skips the stages already done.
"""

from __future__ import annotations

import time
from pathlib import Path

from pickalign.eval.toy.data import generate_toy_dataset, shipped_toy_models

REPO = Path(__file__).resolve().parents[2]
REWARD = "pickscore:eval/toy/assets/pickscore"
CLIP_SCORE = "clip:eval/toy/assets/clip"

# The demo's sizes: the full toy configs, shortened to fit a few minutes on 2 CPU cores.
DATA_PAIRS_PER_PROMPT = 3
DPO_STEPS = 150
ONLINE_ROUNDS = 12
EVAL_PROMPTS = 100
RANK_N = 4


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> None:
    print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)


def _train(recipe_config: str, kind, family: str, overrides: dict) -> Path:
    """A toy recipe's config with ``overrides``, trained in this process; its final/ folder.
    A finished run (final/ present) is not trained again."""
    from pickalign.config import parse_config
    from pickalign.eval.toy.judge import ToyJudgeConfig

    args = ["--config", str(REPO / recipe_config)]
    args += [f"--{key}={value}" for key, value in overrides.items()]
    config, _ = parse_config((kind, ToyJudgeConfig), args)  # the report judges, not the recipe
    final = Path(config.output_dir) / "final"
    if (final / "pytorch_lora_weights.safetensors").exists():
        print(f"   already trained: {final}")
        return final
    print("   accelerate launch " + " ".join(args).replace(str(REPO) + "/", ""))
    from pickalign.align.dpo import DPOConfig

    if kind is DPOConfig:
        from pickalign.align.dpo import train
    else:
        from pickalign.align.reward_weighted import train
    return train(config, family)


def run_demo(out: str | Path = "outputs/demo") -> Path:
    """Run the stages (see the module docstring); returns the report's path."""
    from pickalign.align.dpo import DPOConfig
    from pickalign.align.reward_weighted import RewardWeightedConfig
    from pickalign.eval.generate import ModelSpec
    from pickalign.eval.suite import EvalConfig, evaluate
    from pickalign.reward.data import inspect_split

    out = Path(out).resolve()
    begun = time.perf_counter()
    base = str(shipped_toy_models()["toy-sdxl"].relative_to(REPO))

    started = _stage(
        "1/5 toy Pick-a-Pic data: renders and toy-sdxl samples, labelled by the oracle"
    )
    data = out / "toy_pickapic"
    if not (data / "data" / "test_unique-00000-of-00001.parquet").exists():
        generate_toy_dataset(
            data,
            pairs_per_prompt=DATA_PAIRS_PER_PROMPT,
            eval_pairs_per_prompt=1,
            base_models={"toy-sdxl": shipped_toy_models()["toy-sdxl"]},
            mix={"toy-sdxl": 0.6, "render": 0.25, "render-wrong-1": 0.15},
        )
    print(inspect_split(data, "train", progress=False).summary())
    _done(started)

    started = _stage(f"2/5 reward: the shipped toy PickScore ({REWARD.partition(':')[2]})")
    print(
        "   retrain it: accelerate launch recipes/train_reward.py "
        "--config recipes/configs/reward/toy.yaml"
    )
    _done(started)

    started = _stage(f"3/5 Diffusion-DPO on the toy pairs: {DPO_STEPS} steps")
    dpo = _train(
        "recipes/configs/dpo/toy_sdxl.yaml",
        DPOConfig,
        "sdxl",
        {
            "dataset": data,
            "output_dir": out / "dpo",
            "cache_dir": out / "cache",
            "max_steps": DPO_STEPS,
            "checkpointing_steps": 50,
            "validation_split": "none",
            "report_to": "none",
        },
    )
    _done(started)

    started = _stage(
        f"4/5 online best-of-4 distillation, toy PickScore in the loop: {ONLINE_ROUNDS} rounds"
    )
    online = _train(
        "recipes/configs/reward_weighted/toy_sdxl_best_of_n.yaml",
        RewardWeightedConfig,
        "sdxl",
        {
            "output_dir": out / "online",
            "max_steps": ONLINE_ROUNDS,
            "checkpointing_steps": 4,
            "monitor_every": 4,
            "monitor_count": 32,
            "report_to": "none",
        },
    )
    _done(started)

    started = _stage(f"5/5 evaluation on {EVAL_PROMPTS} held-out prompts: report.html")
    config = EvalConfig(
        title="pickalign demo: the toy loop",
        notes=(
            f"Toy world, toy-sdxl base. DPO: {DPO_STEPS} steps on {data.name} "
            f"({DATA_PAIRS_PER_PROMPT} pairs per train prompt); online: best-of-4 distillation, "
            f"{ONLINE_ROUNDS} rounds of 64 samples, the toy PickScore as the reward; ranking: best "
            f"of {RANK_N} by the toy PickScore. Shortened from the toy configs (their full "
            "figures are in eval/toy/README.md); 'oracle' counts the prompt's attributes the "
            "image gets right (0-3), the ground truth the toy PickScore approximates; 'toy-clip' "
            "is the CLIP score (100 x cosine) of the toy CLIP the toy PickScore started from."
        ),
        prompts="toy:test",
        max_prompts=EVAL_PROMPTS,
        steps=20,
        guidance_scale=5.0,
        batch_size=50,
        output_dir=str(out / "eval"),
        models=[
            ModelSpec("base", base),
            ModelSpec("dpo", base, lora=str(dpo)),
            ModelSpec("online", base, lora=str(online)),
            ModelSpec(f"best-of-{RANK_N}", base, rank_by=REWARD, rank_n=RANK_N),
        ],
        scorers={"toy-pickscore": REWARD, "toy-clip": CLIP_SCORE, "oracle": "toy-oracle"},
        runs={"dpo": str(out / "dpo"), "online": str(out / "online")},
        reward_model=REWARD.partition(":")[2],
        reward_data=str(data),
        grid_prompts=16,
    )
    report = evaluate(config)
    _done(started)
    _summary(report.parent / "results.json")
    print(f"\ndemo finished in {(time.perf_counter() - begun) / 60:.1f} minutes")
    print(f"report: {report}")
    return report


def _summary(results_path: Path) -> None:
    import json

    results = json.loads(results_path.read_text())
    accuracy = results["reward_accuracy"]
    print(
        f"\ntoy PickScore accuracy on the toy test_unique pairs: {accuracy['accuracy']:.3f} "
        f"[{accuracy['accuracy_ci95'][0]:.3f}, {accuracy['accuracy_ci95'][1]:.3f}]"
    )
    names = results["scorer_names"]
    print(f"{'model':12s}" + "".join(f" {name:>22s}" for name in names) + "  oracle win rate")
    for model in results["model_names"]:
        cells = []
        for scorer in names:
            m = results["means"][model][scorer]
            cells.append(f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
        rate = results["win_rates"]["oracle"].get(model, {}).get("base")
        won = f"{rate['estimate']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]" if rate else ""
        print(f"{model:12s}" + "".join(f" {cell:>22s}" for cell in cells) + f"  {won}")
