"""DDPO's held-out learning against wall time: pickalign beside trl 0.23.1's DDPOTrainer.

Both sides start from the shipped toy-sd base with the toy oracle (the perfect reward) as the
reward, and are judged the same way: the oracle's win rate over the base on the same held-out
test prompts and seeds, sampled as the recipes judge (20 DDIM steps, eta 0, guidance 5).

- ``trl``: ``DDPOTrainer`` at its documented defaults (``DDPOConfig()``: 50 sampling steps at
  eta 1 and guidance 5, 2 samples an epoch, one optimizer step per sample over all 50 steps,
  lr 3e-4, clip 1e-4, advantages over the epoch's samples, LoRA rank 4 on the attention
  projections), except what this machine needs: fp32 (``mixed_precision="no"``) and no trainer
  state saved every epoch (``save_freq``). Prompts: the toy train prompts at random. It trains
  for ``--minutes`` and saves its LoRA (``save_pretrained``) at ``--checks`` evenly spaced
  moments of its training time; the clock stops while it saves.
- ``ours``: ``recipes/configs/ddpo/toy_sd.yaml`` as shipped (its monitor and checkpoints
  included) with ``--reward toy-oracle``; each checkpoint's LoRA is a snapshot, timed at the end
  of its round.

Writes ``learning.json`` and ``held_out_vs_time.png`` under ``--out``. trl runs in its own
environment (``bench/online.py``'s docstring says how to make it):

    python bench/ddpo_learning.py learning [--minutes 30] [--checks 6] [--prompts 200] [--seeds 2]

This file also runs under the trl environment (``_trl`` below), so at module level it imports
only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = REPO / "eval/toy/assets/sd"
CONFIG = REPO / "recipes/configs/ddpo/toy_sd.yaml"


def _trl(out: Path, minutes: float, checks: int) -> None:
    """trl 0.23.1's DDPOTrainer at its defaults for ``minutes`` of training; run under its env."""
    import random

    from accelerate import PartialState

    PartialState()  # trl's pipeline logs through accelerate's logger
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from bench.benchlib import pickalign_from_source

    pickalign_from_source()
    from pickalign.reward.toyworld import OracleReward, prompt_splits

    prompts = [a.prompt for a in prompt_splits()["train"]]
    rng, oracle = random.Random(0), OracleReward()

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, prompts, metadata):
        return oracle.score(list(prompts), images), {}

    config = DDPOConfig(
        num_epochs=10**6,
        mixed_precision="no",
        save_freq=10**6,
        log_with=None,
        project_kwargs={"project_dir": str(out / "run")},
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(str(BASE), use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    per_epoch = config.sample_batch_size * config.sample_num_batches_per_epoch
    budget, trained, epoch, global_step, snapshots = minutes * 60, 0.0, 0, 0, []
    for k in range(1, checks + 1):
        while trained < budget * k / checks:
            start = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            trained += time.perf_counter() - start
            epoch += 1
        folder = out / f"snapshot-{k}"
        pipeline.save_pretrained(str(folder))
        snapshots.append({"seconds": trained, "epochs": epoch, "samples": epoch * per_epoch})
        snapshots[-1]["folder"] = str(folder)
        print(f"trl snapshot {k}: {snapshots[-1]}", flush=True)
    (out / "snapshots.json").write_text(json.dumps(snapshots))


def _ours(out: Path, rounds: int | None) -> None:
    """The shipped toy-sd DDPO config with the oracle as the reward; a snapshot per checkpoint.
    ``rounds``: stop there instead of the config's ``max_steps`` (one snapshot, at the end)."""
    from pickalign.align import ddpo
    from pickalign.eval.toy.judge import recipe_config

    argv = ["--config", str(CONFIG), "--model", str(BASE), "--reward", "toy-oracle"]
    argv += ["--output_dir", str(out / "run"), "--checkpoints_total_limit", "1000"]
    argv += ["--report_to", "none"]
    if rounds:
        argv += ["--max_steps", str(rounds), "--checkpointing_steps", str(rounds)]
    config, _ = recipe_config(ddpo.DDPOConfig, argv)
    clock = {"trained": 0.0, "start": None}
    snapshots, rollout, end_round = [], ddpo.rollout, ddpo.end_round

    def timed_rollout(*a, **k):  # the first thing of every round
        clock["start"] = time.perf_counter()
        return rollout(*a, **k)

    def timed_end_round(run, round_, logs, **state):
        end_round(run, round_, logs, **state)  # monitor and checkpoint included
        clock["trained"] += time.perf_counter() - clock["start"]
        if round_ % config.checkpointing_steps == 0:
            folder = out / "run" / "checkpoints" / f"checkpoint-{round_}"
            snapshots.append(
                {
                    "seconds": clock["trained"],
                    "epochs": round_,
                    "samples": round_ * config.samples_per_round,
                    "folder": str(folder),
                }
            )

    ddpo.rollout, ddpo.end_round = timed_rollout, timed_end_round
    ddpo.train(config, "sd")
    (out / "snapshots.json").write_text(json.dumps(snapshots))


def run_side(name: str, python: str, out: Path, args) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [python, __file__, f"_{name}", "--out", str(out)]
    command += ["--minutes", str(args.minutes), "--checks", str(args.checks)]
    if args.ours_rounds:
        command += ["--ours-rounds", str(args.ours_rounds)]
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (out / "log.txt").read_text()[-2000:]
        raise SystemExit(f"the {name} side failed (exit {done.returncode}):\n{tail}")
    return json.loads((out / "snapshots.json").read_text())


def bench_learning(args) -> dict:
    if not Path(args.trl_python).exists():
        raise SystemExit(
            f"{args.trl_python} not found: make trl 0.23.1's environment first "
            "(bench/online.py's docstring says how), or pass --trl-python"
        )
    out = Path(args.out)
    sides = {}
    for name in ("ours", "trl"):
        python = args.trl_python if name == "trl" else sys.executable
        started = time.perf_counter()
        sides[name] = run_side(name, python, out / name, args)
        print(f"{name}: {len(sides[name])} snapshots, {time.perf_counter() - started:.0f} s")
    return judge_sides(sides, args, out)


def judge_sides(sides: dict[str, list[dict]], args, out: Path) -> dict:
    """Every snapshot judged against the base on the same prompts and seeds (the base sampled
    once); ``learning.json`` and the plot."""
    from pickalign.align.monitor import plot_curves
    from pickalign.eval.toy.judge import aligned_vs_base

    folders = [s["folder"] for name in sides for s in sides[name]]
    reports = aligned_vs_base(str(BASE), folders, prompts=args.prompts, seeds_per_prompt=args.seeds)
    judged = iter(reports)
    for name in sides:
        for snapshot in sides[name]:
            report = next(judged)
            snapshot["win_rate"] = report["win_rate"]
            snapshot["all_correct"] = report["aligned"]["all_correct"]
        line = ", ".join(
            f"{s['seconds']:.0f} s: {s['win_rate']['estimate']:.3f}" for s in sides[name]
        )
        print(f"{name}: {line}", flush=True)
    results = {
        "judged_on": f"{args.prompts} test prompts x {args.seeds} seeds",
        "base_all_correct": reports[0]["base"]["all_correct"],
        **sides,
    }
    (out / "learning.json").write_text(json.dumps(results, indent=2))
    labels = {"ours": "pickalign (ddpo/toy_sd.yaml)", "trl": "trl 0.23.1 DDPOTrainer defaults"}
    xs = {labels[n]: [0.0] + [round(s["seconds"], 1) for s in sides[n]] for n in sides}
    series = {labels[n]: [0.5] + [s["win_rate"]["estimate"] for s in sides[n]] for n in sides}
    title = "DDPO, toy-sd base, oracle reward: held-out win rate over the base vs training time"
    plot_curves(out / "held_out_vs_time.png", xs, series, title, "seconds", shared_scale=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    b = sub.add_parser("learning")
    b.add_argument("--trl-python", default=str(REPO / ".cache/venv-trl/bin/python"))
    b.add_argument("--minutes", type=float, default=30.0, help="trl's training time.")
    b.add_argument("--checks", type=int, default=6, help="trl's snapshots.")
    b.add_argument("--prompts", type=int, default=200)
    b.add_argument("--seeds", type=int, default=2)
    b.add_argument("--ours-rounds", type=int, help="Shorten pickalign's run (a quick try).")
    b.add_argument("--out", default=str(REPO / "outputs/bench_ddpo_learning"))
    for side in ("_ours", "_trl"):
        p = sub.add_parser(side)
        p.add_argument("--out", required=True)
        p.add_argument("--minutes", type=float, required=True)
        p.add_argument("--checks", type=int, required=True)
        p.add_argument("--ours-rounds", type=int)
    args = parser.parse_args()
    if args.bench == "_trl":
        _trl(Path(args.out), args.minutes, args.checks)
    elif args.bench == "_ours":
        _ours(Path(args.out), args.ours_rounds)
    else:
        bench_learning(args)


if __name__ == "__main__":
    main()
