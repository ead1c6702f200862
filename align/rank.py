"""Best-of-n ranking at inference (Pick-a-Pic paper, section 5): for each prompt, sample n
candidates over seeds (and, optionally, prompt templates), score them with the reward against the
prompt as written, and keep the best.

``pickalign rank --model PIPE [--lora DIR] --reward pickscore:MODEL --prompt "..." --n 8
--out DIR`` writes every candidate, its score and rank, and the best image of each prompt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pickalign.align.models import DiffusionParts
from pickalign.align.sampler import sample
from pickalign.runtime import atomic_write_json


@dataclass
class Candidate:
    prompt: str  # as the user wrote it: what the reward scores against
    sampled_prompt: str  # the prompt the model saw (a template applied), or the prompt
    seed: int
    score: float
    rank: int  # 0 = best of the prompt's candidates


def best_of_n(
    parts: DiffusionParts,
    prompts: list[str],
    reward,
    n: int = 8,
    first_seed: int = 0,
    templates: list[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 5.0,
    size: int | None = None,
    unet=None,
    batch_size: int = 16,
) -> list[tuple[list[Candidate], list]]:
    """For each prompt: its n candidates (seed ``first_seed + j``; candidate j applies template
    ``j % len(templates)``, a string with ``{prompt}``), scored by ``reward`` against the prompt
    as written and ranked, with their images (PIL), best first. Candidates are sampled with
    deterministic DDIM (eta 0) through ``pickalign.align.sampler``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    templates = templates or ["{prompt}"]
    for template in templates:
        if "{prompt}" not in template:
            raise ValueError(f"template {template!r} has no {{prompt}} placeholder")
    results = []
    for prompt in prompts:
        # replace, not format: other braces in a template are the user's text
        sampled = [templates[j % len(templates)].replace("{prompt}", prompt) for j in range(n)]
        seeds = [first_seed + j for j in range(n)]
        images = []
        for start in range(0, n, batch_size):
            chunk = slice(start, start + batch_size)
            trajectory = sample(
                parts,
                sampled[chunk],
                seeds[chunk],
                steps,
                guidance_scale,
                0.0,
                size,
                unet=unet,
                log_probs=False,
            )
            images += trajectory.pil()
        scores = torch.as_tensor(reward.score([prompt] * n, images)).float().flatten()
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        candidates = [
            Candidate(prompt, sampled[j], seeds[j], float(scores[j]), order.index(j))
            for j in range(n)
        ]
        results.append(([candidates[j] for j in order], [images[j] for j in order]))
    return results


def write_ranking(results, out: str | Path) -> Path:
    """Write ``out/<k>/<rank>-seed<seed>.png`` for prompt k's candidates (``best.png`` a copy of
    the first) and ``out/ranking.json`` with every candidate's prompt, seed, score, rank and
    path. Returns the manifest's path."""
    out = Path(out)
    manifest = []
    for k, (candidates, images) in enumerate(results):
        folder = out / f"{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for candidate, image in zip(candidates, images):
            path = folder / f"{candidate.rank}-seed{candidate.seed}.png"
            image.save(path)
            manifest.append({**asdict(candidate), "path": str(path.relative_to(out))})
        images[0].save(folder / "best.png")
    atomic_write_json(out / "ranking.json", manifest)
    return out / "ranking.json"


def load_ranking(out: str | Path) -> list[dict]:
    return json.loads((Path(out) / "ranking.json").read_text())
