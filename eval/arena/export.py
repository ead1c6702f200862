"""Export the arena's judgments: a Pick-a-Pic dataset and a judgments table.

- ``out/data/<split>-00000-of-00001.parquet``: the 19 Pick-a-Pic columns (JPEG bytes, image_0
  the image shown on the left, label_0/label_1 = 1/0, 0/1 or 0.5/0.5 for a tie), split by prompt
  (every judgment of a prompt in one split, chosen from a hash of the prompt) into train,
  validation and test, plus validation_unique / test_unique (one judgment per prompt; a split
  with no judgment is left out), so
  ``recipes/train_reward.py`` and ``pickalign data inspect`` read it as it is;
- ``out/judgments.csv``: compare-mode judgments as the evaluation reads them (``human_judgments``
  in an eval config): prompt, image_0, image_1 (the eval manifest's paths), label_0, and the
  models and rater.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

from PIL import Image

LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5)}


def split_of(prompt: str, validation: float, test: float) -> str:
    """A prompt's split, fixed by a hash of the prompt (stable across exports)."""
    position = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if position < test else "validation" if position < test + validation else "train"


def _jpeg(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"export: the judged image {path.name} is missing from {path.parent}; restore it "
            "(the images folder and the database go together)"
        )
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def pickapic_rows(judgments: list[dict], images_dir: Path) -> list[dict]:
    """The judgments as Pick-a-Pic rows (see the module docstring), in judgment order."""
    counts = Counter(j["prompt"] for j in judgments)
    raters = {r: k for k, r in enumerate(dict.fromkeys(j["rater"] for j in judgments))}
    rows = []
    for j in judgments:
        label_0, label_1 = LABELS[j["choice"]]
        best = j["left_uid"] if label_0 > label_1 else j["right_uid"] if label_1 > label_0 else ""
        rows.append(
            {
                "are_different": j["left_uid"] != j["right_uid"],
                "best_image_uid": best,
                "caption": j["prompt"],
                "created_at": j["decided_at"],
                "has_label": True,
                "image_0_uid": j["left_uid"],
                "image_0_url": f"images/{j['left_uid']}.png",
                "image_1_uid": j["right_uid"],
                "image_1_url": f"images/{j['right_uid']}.png",
                "jpg_0": _jpeg(images_dir / f"{j['left_uid']}.png"),
                "jpg_1": _jpeg(images_dir / f"{j['right_uid']}.png"),
                "label_0": label_0,
                "label_1": label_1,
                "model_0": j["left_model"],
                "model_1": j["right_model"],
                "ranking_id": j["id"],
                "user_id": raters[j["rater"]],
                "num_example_per_prompt": counts[j["prompt"]],
                "__index_level_0__": j["id"],
            }
        )
    return rows


def export(
    engine, images_dir: str | Path, out: str | Path, validation: float = 0.1, test: float = 0.1
) -> dict[str, int]:
    """Write the dataset and the judgments table under ``out``; returns rows per split."""
    import pandas as pd

    from pickalign.eval.arena.store import all_judgments
    from pickalign.reward.data import unique_prompt_rows, write_split
    from pickalign.runtime import atomic_path

    out = Path(out)
    judgments = all_judgments(engine)
    by_split: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for judgment in judgments:
        by_split[split_of(judgment["prompt"], validation, test)].append(judgment)
    sizes = {}
    for split, chosen in by_split.items():
        rows = pickapic_rows(chosen, Path(images_dir))
        named = {split: rows} | (
            {f"{split}_unique": unique_prompt_rows(rows)} if split != "train" else {}
        )
        for name, members in named.items():
            stale = out / "data" / f"{name}-00000-of-00001.parquet"
            if members:
                write_split(members, out, name)
            else:  # an empty parquet file would stop `datasets` reading the other splits
                stale.unlink(missing_ok=True)
            sizes[name] = len(members)
    table = pd.DataFrame(
        [
            {
                "prompt": j["prompt"],
                "image_0": j["left_source"],
                "image_1": j["right_source"],
                "label_0": LABELS[j["choice"]][0],
                "model_0": j["left_model"],
                "model_1": j["right_model"],
                "rater": j["rater"],
                "decided_at": j["decided_at"],
            }
            for j in judgments
            if j["mode"] == "compare"
        ],
        columns=[
            "prompt",
            "image_0",
            "image_1",
            "label_0",
            "model_0",
            "model_1",
            "rater",
            "decided_at",
        ],
    )
    with atomic_path(out / "judgments.csv") as tmp:
        table.to_csv(tmp, index=False)
    sizes["judgments"] = len(judgments)
    return sizes
