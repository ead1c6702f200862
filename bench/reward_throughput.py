"""Images per second of PickScore.score against the model card's usage, side by side.

Same CLIP architecture for both (ViT-B/16 vision tower, random weights), 8 prompts x 8 images of
512 px. Paths measured in one run, each repeated and the best kept:

- ceiling: the image tower's raw forward on preprocessed pixels at its best batch size, 8 or
  64 (fp32 and bf16);
- model card: the processor, an fp32 forward, one call per prompt with its 8 images;
- ours: ``PickScore.score`` over all 64 (prompt, image) pairs, fp32 and bf16 autocast.

    python bench/reward_throughput.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch


def build_vit_b16(folder: str):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from reward.tokenizer import build_clip_tokenizer

    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16),
        projection_dim=512,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3
    )
    CLIPProcessor(image_processor, build_clip_tokenizer(folder)).save_pretrained(folder)


def workload(prompts: int = 8, per_prompt: int = 8, size: int = 512):
    from reward.toyworld import all_attributes, render

    rng = np.random.default_rng(0)
    combos = all_attributes()
    texts = [combos[i * 7].prompt for i in range(prompts)]
    images = [
        [render(combos[i * 7], rng, size=size) for _ in range(per_prompt)] for i in range(prompts)
    ]
    return texts, images


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--fp32-only", action="store_true", help="skip the bf16 paths (slow on CPUs without bf16)"
    )
    args = parser.parse_args()

    from transformers import CLIPModel, CLIPProcessor

    from reward.pickscore import PickScore, image_embeddings, text_embeddings

    folder = tempfile.mkdtemp()
    build_vit_b16(folder)
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    texts, images = workload()
    n = sum(len(group) for group in images)
    flat_images = [im for group in images for im in group]
    flat_texts = [t for t, group in zip(texts, images) for _ in group]
    figures = {"images": n, "threads": torch.get_num_threads()}

    pixels = processor.image_processor(images=flat_images, return_tensors="pt").pixel_values

    @torch.inference_mode()
    def tower(dtype, batch):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return [model.get_image_features(pixel_values=pixels[i : i + batch])
                    for i in range(0, n, batch)]  # fmt: skip

    # The ceiling is the raw image tower at its best batch size here (8 or 64).
    precisions = [("fp32", torch.float32)] + ([] if args.fp32_only else [("bf16", torch.bfloat16)])
    for name, dtype in precisions:
        for batch in (64, 8):
            seconds, _ = best_of(args.repeats, lambda d=dtype, b=batch: tower(d, b))
            figures[f"tower_{name}_batch{batch}_images_per_s"] = n / seconds
        figures[f"ceiling_{name}_images_per_s"] = max(
            figures[f"tower_{name}_batch{b}_images_per_s"] for b in (64, 8)
        )

    @torch.inference_mode()
    def model_card():
        scores = []
        for prompt, group in zip(texts, images):
            image_inputs = processor(images=group, return_tensors="pt")
            text_inputs = processor(
                text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            image_embs = image_embeddings(model, image_inputs.pixel_values)
            text_embs = text_embeddings(model, text_inputs.input_ids, text_inputs.attention_mask)
            scores.append(model.logit_scale.exp() * (text_embs @ image_embs.T)[0])
        return torch.cat(scores)

    seconds, reference = best_of(args.repeats, model_card)
    figures["model_card_images_per_s"] = n / seconds
    for name, dtype in precisions:
        scorer = PickScore(model, processor, device="cpu", dtype=dtype)
        seconds, scores = best_of(args.repeats, lambda s=scorer: s.score(flat_texts, flat_images))
        figures[f"ours_{name}_images_per_s"] = n / seconds
        figures[f"ours_{name}_max_rel_diff_vs_fp32_card"] = float(
            ((scores - reference).abs() / reference.abs().clamp_min(1e-6)).max()
        )
    for name, _ in precisions:
        ours = figures[f"ours_{name}_images_per_s"]
        figures[f"ours_{name}_vs_ceiling_{name}"] = ours / figures[f"ceiling_{name}_images_per_s"]
        figures[f"ours_{name}_vs_model_card"] = ours / figures["model_card_images_per_s"]
    figures["machine"] = (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for key, value in figures.items():
        print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
