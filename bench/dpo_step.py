"""Pairs per second and peak memory of one Diffusion-DPO LoRA training step, two designs side by side.

- ours: the reference is the same UNet with its LoRA switched off, and the VAE latents and prompt
  embeddings come from the precompute cache, so a step touches only the UNet;
- common: a separate frozen reference UNet in memory, with the VAE encoder and the text encoder
  run on every step (the layout of the usual Diffusion-DPO training scripts).

Both use SD1.5-sized components with random weights (UNet 860M, VAE 84M, CLIP-L text encoder
123M) and the same loss code (``align.dpo.pair_step``). Each design runs in its own fresh process
so its peak resident memory (ru_maxrss) is its own.

    python bench/dpo_step.py [--resolution 256] [--pairs 1] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )  # fmt: skip


def clip_l_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)  # fmt: skip
    return CLIPTextModel(config).eval().requires_grad_(False)


def run_design(design: str, resolution: int, pairs: int, steps: int, warmup: int) -> dict:
    import copy

    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from align.dpo import lora_reference, pair_step
    from align.lora import add_lora, lora_parameters
    from align.models import Conditioning, unet_forward
    from align.text import tokenize
    from reward.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = sd15_unet()
    latent = resolution // 8
    if design == "common":
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        vae = sd15_vae().eval().requires_grad_(False)
        text_encoder = clip_l_text()
        tokenizer = build_clip_tokenizer(tempfile.mkdtemp())
        pixels = torch.rand(pairs * 2, 3, resolution, resolution) * 2 - 1
        ids = tokenize(tokenizer, ["a photo of a red fox in the snow"] * pairs)

        def reference(noisy, t, cond, time_ids):
            return unet_forward(reference_unet, noisy, t, cond, time_ids)

    add_lora(unet, rank=8)
    unet.train()
    if design == "ours":
        reference = lora_reference(accelerator, unet)
        cached_latents = torch.randn(pairs, 2, 4, latent, latent)
        cached_context = torch.randn(pairs, 77, 768)
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-5)

    def step():
        if design == "ours":
            latents, cond = cached_latents, Conditioning(cached_context)
        else:
            with torch.no_grad():
                encoded = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                cond = Conditioning(text_encoder(ids)[0])
            latents = encoded.view(pairs, 2, 4, latent, latent)
        figures = pair_step(unet, reference, scheduler, latents, cond, None, beta=5000.0)
        figures["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "design": design,
        "pairs_per_s": pairs / min(times),
        "seconds_per_step": times,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the best is kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--design", choices=["ours", "common"], help="run one design here")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.design:
        result = run_design(args.design, args.resolution, args.pairs, args.steps, args.warmup)
        print("RESULT " + json.dumps(result))
        return
    figures = {"resolution": args.resolution, "pairs_per_step": args.pairs,
               "threads": torch.get_num_threads()}  # fmt: skip
    for design in ("ours", "common"):
        command = [sys.executable, __file__, "--design", design, "--resolution",
                   str(args.resolution), "--pairs", str(args.pairs), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            raise SystemExit(f"{design} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        figures[design] = json.loads(line[0][len("RESULT ") :])
    ours, common = figures["ours"], figures["common"]
    figures["speed_ratio"] = ours["pairs_per_s"] / common["pairs_per_s"]
    figures["memory_ratio"] = ours["peak_rss_gb"] / common["peak_rss_gb"]
    figures["machine"] = (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
