"""Pairs per second and peak memory of one Diffusion-DPO LoRA training step, two designs side by side.

- ours: the reference is the same UNet with its LoRA switched off, and the VAE latents and prompt
  embeddings come from the precompute cache, so a step touches only the UNet;
- common: a separate frozen reference UNet in memory, with the VAE encoder and the text encoder
  run on every step (the layout of the usual Diffusion-DPO training scripts).

Both use real-size components with random weights and the same loss code
(``pickalign.align.dpo.pair_step``): SD1.5 (UNet 860M, VAE 84M, CLIP-L text encoder 123M) or SDXL (UNet
2.6B, the same VAE, CLIP-L and OpenCLIP-bigG text encoders). ``--precision bf16`` runs the step
as training does (frozen weights in bf16, LoRA in fp32, autocast). The common design's VAE
follows the usual scripts (``--common-vae auto``): an SD script casts it to the weight dtype, an
SDXL script keeps it in fp32. Under bf16, ours skips peft's LoRA input casts as training does
(``pickalign.align.lora.skip_lora_input_casts``) and the common design keeps them as the usual scripts do
(``--skip-lora-casts``).

Each design runs in its own fresh process, so its peak memory is its own: on a CPU the peak
resident memory of the steps, on a GPU torch's peak allocation of the steps (either peak is
reset once the models are built, so it counts the weights held and everything the steps
allocate, not the transient fp32 copies of building random weights; ``process_peak_rss_gb``
keeps the whole process's peak). On a GPU it also counts the step's FLOPs and reports them
against the measured bf16 matrix-product rate.

The common design's VAE and text encoder time is also measured inside its step, giving
``speed_ratio_ceiling``: the common step over itself without the encoders, i.e. the speed-up that
skipping them buys when everything else costs the same. ``speed_ratio`` near it means ours adds
no overhead of its own; above it, the common design's UNet passes themselves ran slower than
ours (it holds a second UNet and the encoders' activations in memory).

On a shared machine, ``--rounds N`` runs the two designs N times in alternating order and
quotes the median of the per-round ratios, so a drift in the machine's speed moves both alike.

    python bench/dpo_step.py [--resolution 256] [--pairs 1] [--steps 3] [--rounds 3] \
        [--precision bf16] [--json out.json]
    python bench/dpo_step.py --device cuda --family sdxl --resolution 1024 --precision bf16 \
        --pairs 8 --rank 64 --gradient-checkpointing --designs ours
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.benchlib import (  # noqa: E402
    count_flops,
    describe_machine,
    matmul_peak_tflops,
    median,
    peak_memory_gb,
    peak_rss_gb,
    reset_peak_memory,
    synchronize,
    timed,
)


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        cross_attention_dim=2048,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )


def clip_l_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        vocab_size=49408,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def clip_bigg_text():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=1280,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def run_design(design: str, args) -> dict:
    import copy

    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from pickalign.align.dpo import pair_step
    from pickalign.align.finetune import lora_reference
    from pickalign.align.lora import add_lora, lora_parameters, skip_lora_input_casts
    from pickalign.align.models import Conditioning, default_time_ids, unet_forward
    from pickalign.align.text import encode_sd, encode_sdxl
    from pickalign.reward.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16"
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no")
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sdxl = args.family == "sdxl"
    with torch.device(device):
        unet = sdxl_unet() if sdxl else sd15_unet()
    unet.to(dtype=weight_dtype)
    pairs, latent = args.pairs, args.resolution // 8
    time_ids = default_time_ids(args.resolution, 1).expand(pairs, 2, 6).to(device) if sdxl else None
    prompts = ["a photo of a red fox in the snow"] * pairs
    if design == "common":
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        with torch.device(device):
            vae = sd15_vae().eval().requires_grad_(False)
            encoders = [clip_l_text()] + ([clip_bigg_text()] if sdxl else [])
        vae_fp32 = args.common_vae == "fp32" or (args.common_vae == "auto" and sdxl)
        vae.to(dtype=torch.float32 if vae_fp32 else weight_dtype)
        for encoder in encoders:
            encoder.to(dtype=weight_dtype)
        tokenizers = [build_clip_tokenizer(tempfile.mkdtemp()) for _ in encoders]
        pixels = torch.rand(pairs * 2, 3, args.resolution, args.resolution, device=device) * 2 - 1
        pixels = pixels.to(vae.dtype)

        def reference(noisy, t, cond, ids):
            with accelerator.autocast():
                return unet_forward(reference_unet, noisy, t, cond, ids)

    add_lora(unet, rank=args.rank)
    skipping = {"ours": ("ours",), "both": ("ours", "common"), "none": ()}[args.skip_lora_casts]
    if bf16 and design in skipping:  # as training does under mixed precision
        skip_lora_input_casts(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-5)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if design == "ours":
        reference = lora_reference(accelerator, unet)
        cached_latents = torch.randn(pairs, 2, 4, latent, latent, device=device)
        width = 2048 if sdxl else 768
        cached = Conditioning(
            torch.randn(pairs, 77, width, device=device, dtype=weight_dtype),
            torch.randn(pairs, 1280, device=device, dtype=weight_dtype) if sdxl else None,
        )

    encode_times = []  # the common design's VAE and text encoder share of each step

    def step():
        if design == "ours":
            latents, cond = cached_latents, cached
        else:
            start = time.perf_counter()
            with torch.no_grad():
                encoded = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                cond = (
                    Conditioning(*encode_sdxl(tokenizers, encoders, prompts))
                    if sdxl
                    else Conditioning(encode_sd(tokenizers[0], encoders[0], prompts))
                )
            latents = encoded.view(pairs, 2, 4, latent, latent)
            synchronize(device)
            encode_times.append(time.perf_counter() - start)
        figures = pair_step(unet, reference, scheduler, latents, cond, time_ids, beta=5000.0)
        accelerator.backward(figures["loss"])
        optimizer.step()
        optimizer.zero_grad()

    process_peak = peak_rss_gb()  # of setup, before the reset
    steps_only = reset_peak_memory(device)
    times, _ = timed(step, args.steps, args.warmup, device)
    result = {
        "design": design,
        "pairs_per_s": pairs / median(times),
        "seconds_per_step": times,
        "peak_rss_gb": peak_rss_gb(),
        "peak_rss_of": "steps" if steps_only else "process",
        "process_peak_rss_gb": max(process_peak, peak_rss_gb()),
    }
    if encode_times:  # of the timed steps only
        result["encode_seconds_per_step"] = encode_times[-len(times) :]
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = peak_memory_gb(device)
        peak = matmul_peak_tflops(device)
        result["matmul_peak_bf16_tflops"] = peak
        torch.cuda.empty_cache()
        try:  # the counter keeps extra tensors alive: a step at the memory edge can fail here
            flops = count_flops(step)
        except torch.OutOfMemoryError:
            result["step_tflop"] = "out of memory while counting"
        else:
            result["step_tflop"] = flops / 1e12
            result["achieved_tflops"] = flops / median(times) / 1e12
            result["fraction_of_bf16_roofline"] = result["achieved_tflops"] / peak
    return result


def run_in_process(design: str, options: dict) -> dict:
    """One design's figures from a fresh process (its peak memory is then its own)."""
    command = [sys.executable, __file__, "--design", design]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            command += [flag] if value else []
        else:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not line:  # e.g. out of memory: recorded, the other design runs
        print(f"{design} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}", file=sys.stderr)
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"design": design, "error": error[:500]}
    return json.loads(line[0][len("RESULT ") :])


def merge_rounds(results: list[dict]) -> dict:
    """One design's figures over several rounds: per-step lists joined, numbers the median of the
    rounds' (pairs/s from each round's median step), anything else as the first round gave it."""
    if len(results) == 1 or any("error" in r for r in results):
        return next((r for r in results if "error" in r), results[0])
    merged = {}
    for key, first in results[0].items():
        values = [r.get(key) for r in results]
        if all(isinstance(value, list) for value in values):
            merged[key] = [x for value in values for x in value]
        elif all(isinstance(value, float) for value in values):
            merged[key] = median(values)
        else:
            merged[key] = first
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--family", choices=["sd", "sdxl"], default="sd")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--common-vae",
        choices=["auto", "fp32", "weight"],
        default="auto",
        help="the common design's VAE dtype: auto (SD: the weight dtype, SDXL: fp32), fp32, or "
        "the weight dtype",
    )
    parser.add_argument(
        "--skip-lora-casts",
        choices=["ours", "both", "none"],
        default="ours",
        help="under bf16, which designs skip peft's LoRA input casts: ours (as pickalign "
        "training does; the usual scripts keep them), both, or none",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is kept)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each design this many times, alternating their order; ratios are the median "
        "of the rounds' ratios",
    )
    parser.add_argument("--designs", default="ours,common", help="comma-separated")
    parser.add_argument("--design", choices=["ours", "common"], help="run one design here")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.design:
        print("RESULT " + json.dumps(run_design(args.design, args)))
        return
    options = {
        k: v for k, v in vars(args).items() if k not in ("design", "designs", "json", "rounds")
    }
    figures = dict(options, threads=torch.get_num_threads(), machine=describe_machine(args.device))
    designs = args.designs.split(",")
    rounds = []
    for index in range(args.rounds):  # alternate the order, so drift moves both designs alike
        order = designs if index % 2 == 0 else designs[::-1]
        rounds.append({design: run_in_process(design, options) for design in order})
    for design in designs:
        figures[design] = merge_rounds([results[design] for results in rounds])
    if len(designs) == 2 and all("error" not in figures[d] for d in designs):
        memory = "peak_gpu_memory_gb" if args.device != "cpu" else "peak_rss_gb"
        speed, space = [], []
        for results in rounds:
            ours, common = results["ours"], results["common"]
            speed.append(ours["pairs_per_s"] / common["pairs_per_s"])
            space.append(ours[memory] / common[memory])
        figures["speed_ratio"], figures["memory_ratio"] = median(speed), median(space)
        if args.rounds > 1:
            figures["speed_ratio_per_round"], figures["memory_ratio_per_round"] = speed, space
        # What skipping the encoders can buy at most: the common step against itself without them.
        common = figures["common"]
        encode = median(common["encode_seconds_per_step"])
        step = median(common["seconds_per_step"])
        figures["speed_ratio_ceiling"] = step / (step - encode)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
