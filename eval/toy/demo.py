"""The offline demo behind ``make demo``: the toy preference world end to end.

1. Build the toy Pick-a-Pic dataset if it is missing (renders and the shipped base models'
   samples, labelled by the oracle) and read it back through the data layer.
2. Sample the shipped SD-style and SDXL-style toy base models on held-out prompts.
3. Judge the samples with the oracle: adherence of each model, the win rate of one over the
   other, and an image grid with the oracle's verdict under every image.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from eval.toy.data import generate_toy_dataset, shipped_toy_models
from eval.toy.judge import oracle_compare, sample_held_out
from reward.data import inspect_split
from reward.runtime import atomic_write_json
from reward.toyworld import ATTRIBUTE_NAMES, judge

CELL = 96


def verdict_grid(prompts: list[str], columns: dict[str, list[Image.Image]]) -> Image.Image:
    """One row per prompt, one column per model; under each image the attributes it got right."""
    label_height, names = 26, list(columns)
    width, height = CELL * len(names), (CELL + label_height) * len(prompts) + 14
    grid = Image.new("RGB", (width + 190, height), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(names):
        draw.text((col * CELL + 4, 2), name, fill="black")
    for row, prompt in enumerate(prompts):
        top = 14 + row * (CELL + label_height)
        draw.text((width + 6, top + CELL // 2), prompt.removeprefix("a "), fill="black")
        for col, name in enumerate(names):
            image = columns[name][row]
            grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (col * CELL, top))
            verdict = judge(prompt, image)
            marks = " ".join(
                f"{attr[0].upper()}{'+' if ok else '-'}" for attr, ok in verdict.satisfied.items()
            )
            colour = "darkgreen" if verdict.all_correct else "firebrick"
            draw.text((col * CELL + 4, top + CELL + 4), marks, fill=colour)
    return grid


def run_demo(out: Path, prompts: int = 200, grid_rows: int = 12) -> Path:
    from diffusers import DiffusionPipeline

    models = shipped_toy_models()
    if set(models) != {"toy-sd", "toy-sdxl"}:
        raise FileNotFoundError(
            f"the toy base models are missing from {Path(__file__).parent / 'assets'}; "
            "rebuild them with recipes/pretrain_toy.py"
        )
    data = out / "toy_pickapic"
    if not (data / "data" / "test_unique-00000-of-00001.parquet").exists():
        print(f"building the toy Pick-a-Pic dataset in {data} ...")
        generate_toy_dataset(data)
    print(inspect_split(data, "train", progress=False).summary())

    samples = {}
    for name, folder in models.items():
        print(f"sampling {name} on {prompts} held-out prompts ...")
        test, samples[name] = sample_held_out(
            DiffusionPipeline.from_pretrained(folder), "test", prompts
        )
    result = oracle_compare(test, samples["toy-sdxl"], samples["toy-sd"])
    report = {
        "prompts": len(test),
        "adherence": {"toy-sdxl": result["a"], "toy-sd": result["b"]},
        "win_rate_sdxl_over_sd": result["win_rate"].as_dict(),
        "changes_sdxl_over_sd": result["changes"],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    grid_path = out / "base_samples.png"
    verdict_grid(test[:grid_rows], {n: s[:grid_rows] for n, s in samples.items()}).save(grid_path)

    print(f"\noracle adherence on {len(test)} held-out prompts (all three attributes right):")
    for name, figures in report["adherence"].items():
        per = ", ".join(f"{a} {figures[a]:.0%}" for a in ATTRIBUTE_NAMES)
        print(f"  {name:9s} {figures['all_correct']:.1%}  ({per})")
    print(f"  win rate toy-sdxl over toy-sd: {result['win_rate']}")
    print(f"\ndemo outputs in {out.resolve()}:")
    print(f"  toy dataset (Pick-a-Pic schema): {data.resolve()}")
    print(f"  image grid with oracle verdicts: {grid_path.resolve()}")
    print(f"  figures:                         {(out / 'report.json').resolve()}")
    return grid_path
