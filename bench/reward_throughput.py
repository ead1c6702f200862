"""Images per second of PickScore.score against the model card's usage, side by side.

Same CLIP architecture for both, random weights: ViT-B/16 on a CPU, ViT-H/14 (PickScore's own
size) on a GPU; 8 prompts x 8 images of 512 px by default. Paths measured in one run, round-robin
(each repeat times every path once, so a shared machine's drift moves them alike), each figure
the median of its repeats after warm-up:

- ceiling: the image tower's raw forward on already-preprocessed pixels, batch 64 and 8, in
  each precision exactly as ``PickScore`` runs it (fp32; bf16 autocast on a CPU, bf16 weights
  on a GPU);
- model card: the processor, an fp32 forward, one call per prompt with its images;
- ours: ``PickScore.score`` over all (prompt, image) pairs, fp32 and bf16 (on a GPU it also
  preprocesses on the device); on a GPU also with the images given as decoded float tensors
  already on the GPU, as a sampling pipeline hands them over.

On a GPU it also reports the bf16 roofline: FLOPs of one ``score`` call (counted by torch's FLOP
counter) times calls per second, over the measured rate of an 8192^3 bf16 matrix product. On a
CPU it reports the matrix-product bound instead: this CPU's measured rate for the tower's own MLP
product, in fp32 and in bf16, over the tower's FLOPs per image: the fastest any path could embed
an image if everything but the matrix products were free.

    python bench/reward_throughput.py [--repeats N] [--fp32-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.benchlib import (  # noqa: E402
    count_flops,
    describe_machine,
    matmul_peak_tflops,
    matmul_tflops,
    median,
    round_robin,
)

# (text tower, vision tower, projection) sizes
ARCHS = {
    "vit-b16": (
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
        ),
        512,
    ),
    "vit-h14": (  # laion/CLIP-ViT-H-14, PickScore's architecture
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            hidden_act="gelu",
        ),
        dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            hidden_act="gelu",
        ),
        1024,
    ),
}


def build_clip(arch: str, device: str):
    """A CLIP of ``arch`` with random weights (fp32, on ``device``) and its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pickalign.reward.tokenizer import build_clip_tokenizer

    text, vision, projection = ARCHS[arch]
    config = CLIPConfig(
        text_config=dict(max_position_embeddings=77, vocab_size=49408, **text),
        vision_config=dict(image_size=224, **vision),
        projection_dim=projection,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(config).eval().requires_grad_(False)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3
    )
    processor = CLIPProcessor(image_processor, build_clip_tokenizer(tempfile.mkdtemp()))
    return model, processor


def workload(prompts: int, per_prompt: int, size: int):
    from pickalign.reward.toyworld import all_attributes, render

    rng = np.random.default_rng(0)
    combos = all_attributes()
    texts = [combos[i * 7 % len(combos)].prompt for i in range(prompts)]
    images = [
        [render(combos[i * 7 % len(combos)], rng, size=size) for _ in range(per_prompt)]
        for i in range(prompts)
    ]
    return texts, images


@torch.inference_mode()
def tower(scorer, pixels: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The image tower alone on already-preprocessed pixels, in batches, as ``scorer`` runs it."""
    from pickalign.reward.pickscore import image_embeddings

    with scorer._autocast():
        return [
            image_embeddings(scorer.model, pixels[i : i + batch])
            for i in range(0, len(pixels), batch)
        ]


def agreement(scores: torch.Tensor, reference: torch.Tensor, per_prompt: int) -> dict:
    """How far scores are from the fp32 model card's: elementwise and norm-wise relative
    difference, and the share of prompts whose best image is the same."""
    best = scores.view(-1, per_prompt).argmax(1) == reference.view(-1, per_prompt).argmax(1)
    return {
        "max_rel_diff": float(((scores - reference).abs() / reference.abs().clamp_min(1e-6)).max()),
        "norm_rel_diff": float((scores - reference).norm() / reference.norm()),
        "same_best_image": float(best.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--arch", choices=sorted(ARCHS), help="default: vit-h14 on a GPU, else vit-b16"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--per-prompt", type=int, default=8, help="images per prompt")
    parser.add_argument("--size", type=int, default=512, help="image side in px")
    parser.add_argument("--repeats", type=int, help="timed calls per path (default 3 CPU, 20 GPU)")
    parser.add_argument(
        "--fp32-only", action="store_true", help="skip the bf16 paths (slow on CPUs without bf16)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time ours bf16 with the vision tower under torch.compile",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from pickalign.reward.pickscore import PickScore, image_embeddings, text_embeddings

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    arch = args.arch or ("vit-h14" if on_gpu else "vit-b16")
    repeats = args.repeats or (20 if on_gpu else 3)
    warmup = 2 if on_gpu else 1
    model, processor = build_clip(arch, args.device)
    texts, images = workload(args.prompts, args.per_prompt, args.size)
    flat_images = [im for group in images for im in group]
    flat_texts = [t for t, group in zip(texts, images) for _ in group]
    n = len(flat_images)
    figures = {
        "arch": arch,
        "images": n,
        "image_px": args.size,
        "repeats": repeats,
        "machine": describe_machine(device),
    }

    # Every path is registered first, then timed round-robin (benchlib.round_robin).
    paths: dict[str, object] = {}

    @torch.inference_mode()
    def model_card():
        scores = []
        for prompt, group in zip(texts, images):
            image_inputs = processor(images=group, return_tensors="pt").to(device)
            text_inputs = processor(
                text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
            ).to(device)
            image_embs = image_embeddings(model, image_inputs.pixel_values)
            text_embs = text_embeddings(model, text_inputs.input_ids, text_inputs.attention_mask)
            scores.append(model.logit_scale.exp() * (text_embs @ image_embs.T)[0])
        return torch.cat(scores).cpu()

    paths["model_card"] = model_card
    pixels = processor.image_processor(images=flat_images, return_tensors="pt").pixel_values
    decoded = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in flat_images])
    decoded = decoded.to(device).float() / 255
    pixels = pixels.to(device)
    precisions = [("fp32", torch.float32)] + ([] if args.fp32_only else [("bf16", torch.bfloat16)])
    scorers = {}
    for name, dtype in precisions:
        # PickScore on a GPU casts a frozen model to bf16 in place: give each scorer its copy
        scorer = PickScore(copy.deepcopy(model) if on_gpu else model, processor, device, dtype)
        scorers[name] = scorer
        for batch in (64, 8):
            paths[f"tower_{name}_batch{batch}"] = lambda b=batch, s=scorer: tower(s, pixels, b)
        if on_gpu:  # the default batch halves a call of up to 128 images to overlap host work
            paths[f"ours_{name}_batch64"] = lambda s=scorer: s.score(flat_texts, flat_images, 64)
            # the same images as a pipeline decodes them: float tensors in [0, 1] on the GPU
            paths[f"ours_{name}_from_gpu_tensors"] = lambda s=scorer: s.score(
                flat_texts, decoded, 64
            )
        paths[f"ours_{name}"] = lambda s=scorer: s.score(flat_texts, flat_images)
    if on_gpu:
        scorer = scorers.get("bf16", scorers["fp32"])
        paths["device_preprocessing_only"] = lambda: scorer.device_pixels(flat_images)

    def rates(paths):
        times, results = round_robin(paths, repeats, warmup, device)
        for name in paths:
            figures[f"{name}_images_per_s"] = n / median(times[name])
        return results

    results = rates(paths)
    reference = results["model_card"]
    for name, _ in precisions:
        figures[f"ceiling_{name}_images_per_s"] = max(
            figures[f"tower_{name}_batch{b}_images_per_s"] for b in (64, 8)
        )
        for key, value in agreement(results[f"ours_{name}"], reference, args.per_prompt).items():
            figures[f"ours_{name}_{key}_vs_fp32_card"] = value
        ours = figures[f"ours_{name}_images_per_s"]
        figures[f"ours_{name}_vs_ceiling_{name}"] = ours / figures[f"ceiling_{name}_images_per_s"]
        figures[f"ours_{name}_vs_model_card"] = ours / figures["model_card_images_per_s"]

    with torch.inference_mode():
        k = min(8, n)
        tower_flops = count_flops(lambda: image_embeddings(model, pixels[:k])) / k
    figures["tower_gflops_per_image"] = tower_flops / 1e9
    if not on_gpu:
        # What bounds a CPU: the image tower is matrix products, so its ceiling is this CPU's
        # matrix-product rate in each precision, measured on the tower's own MLP product (a
        # batch of 8 images' tokens times the first MLP weight).
        vision = model.config.vision_config
        tokens = 8 * ((vision.image_size // vision.patch_size) ** 2 + 1)
        shape = (tokens, vision.hidden_size, vision.intermediate_size)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate_gflops = matmul_tflops(device, *shape, dtype, repeats=5, warmup=1) * 1e3
            figures[f"matmul_{name}_gflops"] = rate_gflops
            figures[f"matmul_bound_{name}_images_per_s"] = (
                rate_gflops / figures["tower_gflops_per_image"]
            )
        for name in ("model_card", "ours_fp32", "ceiling_fp32"):
            figures[f"{name}_share_of_fp32_matmul_bound"] = (
                figures[f"{name}_images_per_s"] / figures["matmul_bound_fp32_images_per_s"]
            )
        figures["best_possible_fp32_vs_model_card"] = (
            figures["matmul_bound_fp32_images_per_s"] / figures["model_card_images_per_s"]
        )
    else:
        peak = matmul_peak_tflops(device)
        flops = count_flops(lambda: scorer.score(flat_texts, flat_images))
        figures["matmul_peak_bf16_tflops"] = peak
        figures["score_call_gflops_per_image"] = flops / n / 1e9
        for name, _ in precisions:
            achieved = figures[f"ours_{name}_images_per_s"] * flops / n / 1e12
            figures[f"ours_{name}_tflops"] = achieved
            figures[f"ours_{name}_fraction_of_bf16_roofline"] = achieved / peak
            achieved = figures[f"ceiling_{name}_images_per_s"] * tower_flops / 1e12
            figures[f"ceiling_{name}_fraction_of_bf16_roofline"] = achieved / peak
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9

    def dump():
        for key, value in figures.items():
            print(f"{key:50s} {value:.4g}" if isinstance(value, float) else f"{key:50s} {value}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")

    dump()  # before the optional compiled run, which can take minutes
    if args.compile and "bf16" in scorers:
        try:
            scorer = PickScore(
                copy.deepcopy(model), processor, device, torch.bfloat16, compile=True
            )

            rates(
                {
                    "tower_bf16_compiled_batch64": lambda: tower(scorer, pixels, 64),
                    "ours_bf16_compiled": lambda: scorer.score(flat_texts, flat_images),
                }
            )
            for name in ("tower_bf16_compiled_batch64", "ours_bf16_compiled"):
                achieved = figures[f"{name}_images_per_s"] * figures["score_call_gflops_per_image"]
                figures[f"{name}_fraction_of_bf16_roofline"] = (
                    achieved / 1e3 / figures["matmul_peak_bf16_tflops"]
                )
            figures["ours_bf16_compiled_vs_model_card"] = (
                figures["ours_bf16_compiled_images_per_s"] / figures["model_card_images_per_s"]
            )
        except Exception as error:  # noqa: BLE001 - an optional extra; the rest stands
            figures["ours_bf16_compiled_error"] = repr(error)[:300]
        print("-- with the vision tower compiled:")
        dump()


if __name__ == "__main__":
    main()
