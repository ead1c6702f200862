"""Online alignment's speed, side by side in one run.

- ``sampler``: images/s of ``pickalign.align.sampler.sample`` (stochastic DDIM at eta 1, recording the whole
  trajectory and every step's log-probability) against the stock diffusers pipeline call
  ``pipe(prompts, generator=[...], eta=1, output_type="pt")`` on the same model, steps, guidance
  and batch, timed round-robin in one process (target: at most 10% overhead). It also reports
  the largest difference between the two paths' images, which should be float noise.
- ``ddpo``: samples/s of a DDPO epoch (sample, score, train) of pickalign's ``pickalign.align.ddpo.train``
  and of trl 0.23.1's ``DDPOTrainer`` (the last trl release that shipped it) on the same tiny SD
  pipeline (the shipped toy-sd base), the same reward (the toy world's oracle), prompts (the toy
  train prompts), samples, steps, batch sizes, LoRA (rank 4 on the attention projections, trl's
  fixed choice) and optimizer settings, with per-prompt reward statistics on both. Each side runs
  in its own process and environment; ``--rounds`` alternates them, and the figure is the median
  over rounds of the per-round ratio, so a drift in a shared machine's speed moves both alike.
  The first epoch of each run warms up and is not counted. A third process, ``floor``, runs
  the same UNet, VAE and reward calls with nothing around them; floor / trl is the most any
  loop could gain over trl at these settings on the machine (``ceiling``). Writes
  ``reward_vs_time.png``: the epoch's mean reward against wall time, both sides.
- ``real`` (for a GPU): DDPO epochs of ``pickalign.align.ddpo.train`` on SD 1.5's or SDXL's real
  architecture with random weights (a pipeline saved once under ``--out``), a reward that costs
  nothing (the mean pixel), bf16 on a GPU: samples/s after the first epoch and peak memory.

trl 0.23.1 needs transformers 4.x, so it lives in its own environment:

    python3.11 -m venv .cache/venv-trl
    .cache/venv-trl/bin/pip install torch==2.13.0 trl==0.23.1 transformers==4.56.2 \
        diffusers==0.35.1 accelerate==1.10.1 peft==0.17.1 "datasets<4.2"

    python bench/online.py sampler [--family sd sdxl] [--batch 64] [--steps 20] [--repeats 5]
    python bench/online.py ddpo [--trl-python .cache/venv-trl/bin/python] [--epochs 6] \
        [--rounds 2] [--out outputs/bench_online]
    python bench/online.py real --family sdxl --resolution 1024 --samples 16 --steps 20 \
        [--gradient-checkpointing] [--epochs 3]

This file also runs under the trl environment (``_trl`` below), so at module level it imports
only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOY = {"sd": REPO / "eval/toy/assets/sd", "sdxl": REPO / "eval/toy/assets/sdxl"}

# One DDPO epoch, the same on both sides: the toy DDPO config's sizes (64 samples in one
# sampling batch, 20 DDIM steps at eta 1 and guidance 5, training on 8 of the 20 steps of
# each sample in micro-batches of 16, one optimizer step per epoch).
EPOCH = dict(
    samples=64,
    sample_batch=64,
    steps=20,
    eta=1.0,
    guidance=5.0,
    train_batch=16,
    accumulation=4,
    timestep_fraction=0.4,
    learning_rate=1e-3,
    clip_range=1e-4,
    advantage_clip=5.0,
    max_grad_norm=1.0,
    weight_decay=1e-4,
    stat_buffer=16,
    stat_min_count=16,
    lora_rank=4,
    lora_targets=["to_k", "to_q", "to_v", "to_out.0"],
)


# ----------------------------------------------------------------------------------------------
# The sampler against the stock pipeline


def bench_sampler(args) -> dict:
    from bench.benchlib import describe_machine
    from pickalign.reward.toyworld import prompt_splits

    prompts = [a.prompt for a in prompt_splits()["test"]][: args.batch]
    results = {"machine": describe_machine("cpu"), "batch": args.batch, "steps": args.steps}
    for family in args.family:
        results[family] = sampler_paths(TOY[family], prompts, args)
        print(f"sampler {family}: {json.dumps(results[family])}", flush=True)
    return results


def sampler_paths(folder: Path, prompts: list[str], args) -> dict:
    """The stock pipeline call and ``pickalign.align.sampler.sample`` on the pipeline in ``folder``."""
    import torch
    from diffusers import DiffusionPipeline

    from bench.benchlib import median, round_robin
    from pickalign.align.models import parts_from_pipeline
    from pickalign.align.sampler import sample

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    parts = parts_from_pipeline(pipe)
    seeds = list(range(len(prompts)))

    def stock():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(
            prompts,
            generator=generators,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            eta=1.0,
            output_type="pt",
        )
        return out.images

    def ours():
        return sample(parts, prompts, seeds, args.steps, args.guidance, eta=1.0).images

    with torch.inference_mode():
        times, images = round_robin({"stock": stock, "ours": ours}, args.repeats, warmup=1)
    stock_s, ours_s = median(times["stock"]), median(times["ours"])
    return {
        "stock_images_per_s": len(prompts) / stock_s,
        "ours_images_per_s": len(prompts) / ours_s,
        "overhead": ours_s / stock_s - 1,
        "max_image_difference": float((images["ours"] - images["stock"]).abs().max()),
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


# ----------------------------------------------------------------------------------------------
# A DDPO epoch: each side in its own process


def _ours(out: Path, epochs: int) -> None:
    """pickalign's DDPO recipe for ``epochs`` rounds; each round's start, end and mean reward."""
    from pickalign.align.ddpo import DDPOConfig

    e = EPOCH
    config = DDPOConfig(
        model=str(TOY["sd"]),
        reward="toy-oracle",
        prompts="toy:train",
        output_dir=str(out / "run"),
        mode="lora",
        lora_rank=e["lora_rank"],
        lora_alpha=e["lora_rank"],
        lora_targets=e["lora_targets"],
        sample_steps=e["steps"],
        guidance_scale=e["guidance"],
        eta=e["eta"],
        samples_per_round=e["samples"],
        sample_batch_size=e["sample_batch"],
        train_batch_size=e["train_batch"],
        gradient_accumulation_steps=e["accumulation"],
        timestep_fraction=e["timestep_fraction"],
        advantages="prompt_stats",
        stat_buffer_size=e["stat_buffer"],
        stat_min_count=e["stat_min_count"],
        clip_range=e["clip_range"],
        advantage_clip=e["advantage_clip"],
        max_grad_norm=e["max_grad_norm"],
        learning_rate=e["learning_rate"],
        weight_decay=e["weight_decay"],
        max_steps=epochs,
        checkpointing_steps=0,
        report_to="none",
        logging_steps=1,
    )
    (out / "epochs.json").write_text(json.dumps(timed_ddpo(config, "sd")))


def samples_per_s(epochs: list[dict], samples: int) -> float:
    """Samples/s over the timed epochs after the first (the first warms up), or the only one."""
    counted = epochs[1:] or epochs
    return samples * len(counted) / sum(ep["end"] - ep["start"] for ep in counted)


def timed_ddpo(config, family: str) -> list[dict]:
    """``pickalign.align.ddpo.train(config, family)``, with each round's start, end and mean reward."""
    from pickalign.align import ddpo

    epochs_seen = []
    rollout, end_round = ddpo.rollout, ddpo.end_round

    def timed_rollout(*a, **k):  # the first thing of every round
        epochs_seen.append({"start": time.perf_counter()})
        return rollout(*a, **k)

    def timed_end_round(run, round_, logs, **state):
        end_round(run, round_, logs, **state)
        epochs_seen[-1].update(end=time.perf_counter(), reward=logs["train/reward_mean"])

    ddpo.rollout, ddpo.end_round = timed_rollout, timed_end_round
    try:
        ddpo.train(config, family)
    finally:
        ddpo.rollout, ddpo.end_round = rollout, end_round
    return epochs_seen


def _trl(out: Path, epochs: int) -> None:
    """trl 0.23.1's DDPOTrainer for ``epochs`` epochs, the same settings; run under its own env."""
    import random

    import torch
    from accelerate import PartialState

    PartialState()  # trl's pipeline logs through accelerate's logger
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from bench.benchlib import pickalign_from_source

    pickalign_from_source()
    from pickalign.reward.toyworld import OracleReward, prompt_splits

    e = EPOCH
    prompts = [a.prompt for a in prompt_splits()["train"]]
    rng = random.Random(0)
    oracle = OracleReward()
    epochs_seen = []

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, prompts, metadata):
        scores = oracle.score(list(prompts), images)
        epochs_seen[-1].setdefault("rewards", []).extend(scores.tolist())
        return scores, {}

    config = DDPOConfig(
        num_epochs=epochs,
        sample_num_steps=e["steps"],
        sample_eta=e["eta"],
        sample_guidance_scale=e["guidance"],
        sample_batch_size=e["sample_batch"],
        sample_num_batches_per_epoch=e["samples"] // e["sample_batch"],
        train_batch_size=e["train_batch"],
        train_gradient_accumulation_steps=e["accumulation"],
        train_timestep_fraction=e["timestep_fraction"],
        train_learning_rate=e["learning_rate"],
        train_adam_weight_decay=e["weight_decay"],
        train_clip_range=e["clip_range"],
        train_adv_clip_max=e["advantage_clip"],
        train_max_grad_norm=e["max_grad_norm"],
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=e["stat_buffer"],
        per_prompt_stat_tracking_min_count=e["stat_min_count"],
        mixed_precision="no",
        log_with=None,
        save_freq=10**6,
        project_kwargs={"project_dir": str(out / "run")},
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(str(TOY["sd"]), use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    assert pipeline.unet.peft_config["default"].r == e["lora_rank"]
    global_step = 0
    for epoch in range(epochs):
        epochs_seen.append({"start": time.perf_counter()})
        global_step = trainer.step(epoch, global_step)
        seen = epochs_seen[-1]
        seen.update(end=time.perf_counter(), reward=float(torch.tensor(seen.pop("rewards")).mean()))
    (out / "epochs.json").write_text(json.dumps(epochs_seen))


def _floor(out: Path, epochs: int) -> None:
    """The model work of an epoch and nothing around it: the same LoRA UNet calls (batched
    guidance, 20 sampling steps without gradients, 8 steps of each sample forward and backward in
    micro-batches of 16), the VAE decode, the oracle, one optimizer step. The fastest any DDPO
    loop can run an epoch at these settings on this machine."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from pickalign.reward.toyworld import OracleReward, prompt_splits

    e = EPOCH
    pipe = StableDiffusionPipeline.from_pretrained(str(TOY["sd"]))
    unet, vae = pipe.unet, pipe.vae
    unet.requires_grad_(False)
    lora = LoraConfig(r=e["lora_rank"], lora_alpha=e["lora_rank"], target_modules=e["lora_targets"])
    unet.add_adapter(lora)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6)
    pipe.scheduler.set_timesteps(e["steps"])
    timesteps = pipe.scheduler.timesteps
    prompts = [a.prompt for a in prompt_splits()["train"]]
    oracle = OracleReward()
    trained = round(e["timestep_fraction"] * e["steps"])
    size = unet.config.sample_size
    epochs_seen = []
    for epoch in range(epochs):
        epochs_seen.append({"start": time.perf_counter()})
        batch = [prompts[(epoch * e["samples"] + i) % len(prompts)] for i in range(e["samples"])]
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(batch, "cpu", 1, True)
            context = torch.cat([uncond, cond])
            x = torch.randn(e["samples"], unet.config.in_channels, size, size)
            latents = [x]
            for t in timesteps:
                pred = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
                u, c = pred.chunk(2)
                x = x - 0.01 * (u + e["guidance"] * (c - u)) + 0.01 * torch.randn_like(x)
                latents.append(x)
            images = vae.decode(x / vae.config.scaling_factor).sample.div(2).add(0.5).clamp(0, 1)
        rewards = oracle.score(batch, images)
        for start in range(0, e["samples"], e["train_batch"]):
            rows = slice(start, start + e["train_batch"])
            ctx = torch.cat([uncond[rows], cond[rows]])
            for j in range(trained):
                x_t = latents[j][rows]
                pred = unet(torch.cat([x_t, x_t]), timesteps[j], encoder_hidden_states=ctx).sample
                u, c = pred.chunk(2)
                (u + e["guidance"] * (c - u)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        epochs_seen[-1].update(end=time.perf_counter(), reward=float(rewards.mean()))
    (out / "epochs.json").write_text(json.dumps(epochs_seen))


# ----------------------------------------------------------------------------------------------
# A DDPO epoch on a real-size architecture (for a GPU)


def brightness(prompts, images):
    """A reward that costs nothing: each image's mean pixel (the real-size runs time the loop)."""
    return images.float().mean(dim=(1, 2, 3))


def real_size_pipeline(family: str, folder: Path, device) -> Path:
    """Save a pipeline with SD 1.5's or SDXL's real architecture and random weights (UNet and
    text encoders in fp16, VAE in fp32) to ``folder``, once."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from bench.dpo_step import clip_bigg_text, clip_l_text, sd15_unet, sd15_vae, sdxl_unet
    from pickalign.align.tiny import save_pipeline, tiny_scheduler
    from pickalign.reward.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = (sdxl_unet() if family == "sdxl" else sd15_unet()).half()
        vae = sd15_vae()
        text = clip_l_text().half()
        text_2 = clip_bigg_text().half() if family == "sdxl" else None
    scheduler = tiny_scheduler()  # SD's DDIM settings, the tiny and toy pipelines' scheduler
    tokenizer = build_clip_tokenizer(folder.parent / f"_{folder.name}_tokenizer")
    parts = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_2, tokenizer_2=tokenizer)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    save_pipeline(pipe, folder)
    shutil.rmtree(folder.parent / f"_{folder.name}_tokenizer", ignore_errors=True)
    return folder


def bench_real(args) -> dict:
    """DDPO epochs of ``pickalign.align.ddpo.train`` on a real-size architecture with random weights:
    samples/s over the epochs after the first, and peak memory (GPU allocation, or RSS)."""
    import torch

    from bench.benchlib import describe_machine, peak_memory_gb, peak_rss_gb
    from pickalign.align.ddpo import DDPOConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    folder = real_size_pipeline(args.family, out / f"pipeline_{args.family}", device)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of object number {i}" for i in range(256)) + "\n")
    config = DDPOConfig(
        model=str(folder),
        reward="bench.online:brightness",
        prompts=str(prompts),
        output_dir=str(out / f"run_{args.family}"),
        resolution=args.resolution,
        mode="lora",
        lora_rank=args.rank,
        sample_steps=args.steps,
        samples_per_round=args.samples,
        sample_batch_size=args.sample_batch,
        train_batch_size=args.train_batch,
        gradient_accumulation_steps=args.samples // args.train_batch,
        timestep_fraction=args.timestep_fraction,
        mixed_precision="bf16" if device == "cuda" else "no",
        gradient_checkpointing=args.gradient_checkpointing,
        max_steps=args.epochs,
        checkpointing_steps=0,
        report_to="none",
        logging_steps=1,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    epochs = timed_ddpo(config, "sdxl" if args.family == "sdxl" else "sd")
    results = {
        "machine": describe_machine(device),
        "family": args.family,
        "resolution": args.resolution,
        "samples_per_epoch": args.samples,
        "steps": args.steps,
        "timestep_fraction": args.timestep_fraction,
        "epoch_seconds": [round(ep["end"] - ep["start"], 2) for ep in epochs],
        "samples_per_s": samples_per_s(epochs, args.samples),
        "peak_gpu_memory_gb": peak_memory_gb(device),
        "peak_rss_gb": peak_rss_gb(),
    }
    print(f"real {args.family}: {json.dumps(results)}", flush=True)
    return results


def run_side(name: str, python: str, out: Path, epochs: int) -> list[dict]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [python, __file__, f"_{name}", "--out", str(out), "--epochs", str(epochs)]
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (out / "log.txt").read_text()[-2000:]
        raise SystemExit(f"the {name} side failed (exit {done.returncode}):\n{tail}")
    return json.loads((out / "epochs.json").read_text())


def bench_ddpo(args) -> dict:
    from statistics import median

    if not Path(args.trl_python).exists():
        raise SystemExit(
            f"{args.trl_python} not found: make trl 0.23.1's environment first (this file's "
            "docstring says how), or pass --trl-python"
        )
    out = Path(args.out)
    runs = {"ours": [], "trl": [], "floor": []}
    for round_ in range(args.rounds):
        order = ("ours", "trl", "floor") if round_ % 2 == 0 else ("trl", "ours", "floor")
        for name in order:
            python = args.trl_python if name == "trl" else sys.executable
            epochs = run_side(name, python, out / f"{name}_{round_}", args.epochs)
            runs[name].append(epochs)
            rates = [EPOCH["samples"] / (ep["end"] - ep["start"]) for ep in epochs[1:]]
            print(f"round {round_} {name}: samples/s {[round(r, 2) for r in rates]}", flush=True)

    def rate(epochs):
        return samples_per_s(epochs, EPOCH["samples"])

    ratios = [rate(o) / rate(t) for o, t in zip(runs["ours"], runs["trl"])]
    ceilings = [rate(f) / rate(t) for f, t in zip(runs["floor"], runs["trl"])]
    results = {
        "epoch": EPOCH,
        "epochs_per_run": args.epochs,
        "rounds": args.rounds,
        "ours_samples_per_s": [rate(r) for r in runs["ours"]],
        "trl_samples_per_s": [rate(r) for r in runs["trl"]],
        "speedup_per_round": ratios,
        "speedup": median(ratios),
        "floor_samples_per_s": [rate(r) for r in runs["floor"]],
        "ceiling_per_round": ceilings,
        "ceiling": median(ceilings),
        "rewards": {
            name: [[round(ep["reward"], 4) for ep in r] for r in runs[name]]
            for name in ("ours", "trl")
        },
    }
    plot_rewards(runs, out / "reward_vs_time.png")
    print(f"ddpo: {json.dumps(results)}", flush=True)
    return results


def plot_rewards(runs: dict, path: Path) -> None:
    """Each run's epoch mean reward against seconds since its first epoch began, one scale."""
    from pickalign.align.monitor import plot_curves

    xs, series = {}, {}
    for name, label in (("ours", "pickalign"), ("trl", "trl 0.23.1")):
        for i, epochs in enumerate(runs[name]):
            key = f"{label}, run {i + 1}"
            xs[key] = [round(ep["end"] - epochs[0]["start"], 1) for ep in epochs]
            series[key] = [ep["reward"] for ep in epochs]
    title = "DDPO on the toy-sd base, same settings: epoch mean reward (toy oracle) vs wall time"
    plot_curves(path, xs, series, title=title, x_label="seconds", shared_scale=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sampler")
    s.add_argument("--family", nargs="+", default=["sd", "sdxl"], choices=["sd", "sdxl"])
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--repeats", type=int, default=5)
    d = sub.add_parser("ddpo")
    d.add_argument("--trl-python", default=str(REPO / ".cache/venv-trl/bin/python"))
    d.add_argument("--epochs", type=int, default=6)
    d.add_argument("--rounds", type=int, default=2)
    d.add_argument("--out", default=str(REPO / "outputs/bench_online"))
    r = sub.add_parser("real")
    r.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    r.add_argument("--resolution", type=int, default=None, help="Default: the model's.")
    r.add_argument("--samples", type=int, default=32, help="Samples per epoch.")
    r.add_argument("--sample-batch", type=int, default=16)
    r.add_argument("--train-batch", type=int, default=4)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--timestep-fraction", type=float, default=0.5)
    r.add_argument("--rank", type=int, default=8)
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--out", default=str(REPO / "outputs/bench_online_real"))
    for p in (s, d, r):
        p.add_argument("--json", help="Also write the results to this file.")
    for side in ("_ours", "_trl", "_floor"):
        p = sub.add_parser(side)
        p.add_argument("--out", required=True)
        p.add_argument("--epochs", type=int, required=True)
    args = parser.parse_args()
    if args.bench.startswith("_"):
        {"_ours": _ours, "_trl": _trl, "_floor": _floor}[args.bench](Path(args.out), args.epochs)
        return
    results = {"sampler": bench_sampler, "ddpo": bench_ddpo, "real": bench_real}[args.bench](args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
