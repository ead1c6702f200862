"""The Pick-a-Pic data layer: load the datasets by Hub id or from a local folder, decode pairs,
filter them, and deal with bad rows loudly (an error naming the row and column) or, under an
explicit skip policy, by counting them per reason.

Schema (19 columns, one row = one prompt, two images, one user's choice)::

    are_different, best_image_uid, caption, created_at, has_label, image_0_uid, image_0_url,
    image_1_uid, image_1_url, jpg_0, jpg_1, label_0, label_1, model_0, model_1, ranking_id,
    user_id, num_example_per_prompt, __index_level_0__

``label_0, label_1`` is (1, 0), (0, 1) or (0.5, 0.5) for a tie. The ``_no_images`` variants have
the same columns without image bytes (URLs only).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

PICKAPIC_COLUMNS = (
    "are_different",
    "best_image_uid",
    "caption",
    "created_at",
    "has_label",
    "image_0_uid",
    "image_0_url",
    "image_1_uid",
    "image_1_url",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "ranking_id",
    "user_id",
    "num_example_per_prompt",
    "__index_level_0__",
)
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
HUB_DATASETS = (
    "yuvalkirstain/pickapic_v1",
    "yuvalkirstain/pickapic_v2",
    "yuvalkirstain/pickapic_v1_no_images",
    "yuvalkirstain/pickapic_v2_no_images",
)
VALID_LABELS = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))
BadRowPolicy = Literal["error", "skip"]


class BadRowError(ValueError):
    """A row that cannot become a pair. Carries the row index, the column and the reason."""

    def __init__(self, index: int, column: str, reason: str, detail: str = ""):
        self.index, self.column, self.reason = index, column, reason
        message = f"bad row {index}, column '{column}': {reason}"
        super().__init__(f"{message} ({detail})" if detail else message)


@dataclass
class Pair:
    """One decoded preference pair. Images are RGB, or None for the ``_no_images`` variants."""

    prompt: str
    image_0: Image.Image | None
    image_1: Image.Image | None
    label_0: float
    label_1: float
    index: int
    num_example_per_prompt: int = 1

    @property
    def is_tie(self) -> bool:
        return self.label_0 == self.label_1


@dataclass
class PairFilter:
    """Which rows become training pairs."""

    require_label: bool = True  # drop rows the user never labelled (has_label false)
    keep_ties: bool = True  # keep 0.5/0.5 rows
    require_different: bool = True  # drop rows whose two images are the same (are_different false)


@dataclass
class DataReport:
    """What happened to every row read: kept, filtered out (by filter) or bad (by reason)."""

    rows: int = 0
    pairs: int = 0
    ties: int = 0
    dropped: Counter = field(default_factory=Counter)  # "unlabeled", "not_different", "tie"
    bad: Counter = field(default_factory=Counter)  # "<reason> (<column>)"

    def summary(self) -> str:
        lines = [
            f"rows read:        {self.rows}",
            f"usable pairs:     {self.pairs} (ties among them: {self.ties})",
            f"unlabeled rows:   {self.dropped['unlabeled']} (dropped)",
            f"identical images: {self.dropped['not_different']} (dropped)",
        ]
        if self.dropped["tie"]:
            lines.append(f"ties dropped:     {self.dropped['tie']}")
        lines.append(f"bad rows:         {sum(self.bad.values())}")
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.bad.items())]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Loading


def _local_split_files(folder: Path, split: str) -> tuple[str, list[str]]:
    """Find a split's files in a local folder, in the Hub layout or a flat one."""
    patterns = [
        f"data/{split}-*.parquet",  # the Hub layout: data/train-00000-of-00042.parquet
        f"{split}/*.parquet",
        f"{split}.parquet",
        f"{split}-*.parquet",
        f"{split}/*.arrow",
        f"{split}.arrow",
    ]
    for pattern in patterns:
        files = sorted(str(p) for p in folder.glob(pattern))
        # "train-*" must not pick up another split whose name starts the same way.
        files = [f for f in files if not Path(f).name.startswith(f"{split}_")]
        if files:
            return ("arrow" if files[0].endswith(".arrow") else "parquet"), files
    raise FileNotFoundError(
        f"no files for split '{split}' in {folder} (looked for {', '.join(patterns)})"
    )


def load_pickapic(source: str | Path, split: str = "train", streaming: bool | None = None):
    """Load one split of a Pick-a-Pic dataset as a ``datasets`` (Iterable)Dataset.

    ``source`` is a Hub id (``yuvalkirstain/pickapic_v2``, ...) or a local folder of parquet or
    arrow files with the same schema (Hub layout ``data/<split>-*.parquet``, ``<split>/*.parquet``,
    ``<split>.parquet``, or a ``save_to_disk`` folder). Hub image sets stream by default: they
    are hundreds of GB.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; Pick-a-Pic splits are {', '.join(SPLITS)}")
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))[split]
        if (path / split / "state.json").exists():
            return datasets.load_from_disk(str(path / split))
        builder, files = _local_split_files(path, split)
        return datasets.load_dataset(
            builder, data_files={split: files}, split=split, streaming=bool(streaming)
        )
    if streaming is None:
        streaming = not str(source).endswith("_no_images")
    return datasets.load_dataset(str(source), split=split, streaming=streaming)


# ----------------------------------------------------------------------------------------------
# Decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB: alpha is composited on white; 16-bit and float greyscale rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array.clip(0, top) / top * 255).round().astype("uint8"), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(value: Any) -> Image.Image:
    """Decode raw image bytes (or a ``datasets`` Image dict / PIL image) to a loaded RGB image."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected image bytes, got {type(value).__name__}")
    image = Image.open(io.BytesIO(bytes(value)))
    image.load()
    return to_rgb(image)


def _required(row: dict, index: int, column: str) -> Any:
    if column not in row:
        raise BadRowError(index, column, "missing column")
    if row[column] is None:
        raise BadRowError(index, column, "null value")
    return row[column]


def decode_pair(row: dict, index: int, filters: PairFilter | None = None) -> Pair | str:
    """Turn one row into a :class:`Pair`.

    Returns the name of the filter that dropped it (``"unlabeled"``, ``"not_different"``,
    ``"tie"``) for a well-formed row the filters exclude, and raises :class:`BadRowError` for a
    malformed one.
    """
    filters = filters or PairFilter()
    if filters.require_label and not _required(row, index, "has_label"):
        return "unlabeled"
    if filters.require_different and not _required(row, index, "are_different"):
        return "not_different"
    prompt = _required(row, index, "caption")
    if not isinstance(prompt, str):
        raise BadRowError(index, "caption", "not a string", type(prompt).__name__)
    try:
        labels = (float(_required(row, index, "label_0")), float(_required(row, index, "label_1")))
    except (TypeError, ValueError) as error:
        raise BadRowError(index, "label_0", "invalid labels", str(error)) from error
    if labels not in VALID_LABELS:
        raise BadRowError(index, "label_0/label_1", "invalid labels", f"got {labels}")
    if labels == (0.5, 0.5) and not filters.keep_ties:
        return "tie"
    images = []
    has_images = "jpg_0" in row or "jpg_1" in row  # the _no_images variants have URLs only
    for column in ("jpg_0", "jpg_1"):
        if not has_images:
            images.append(None)
            continue
        try:
            images.append(decode_image(_required(row, index, column)))
        except BadRowError:
            raise
        except (UnidentifiedImageError, OSError, TypeError, ValueError) as error:
            raise BadRowError(index, column, "undecodable image", str(error)) from error
    count = row.get("num_example_per_prompt") or 1
    return Pair(prompt, images[0], images[1], *labels, index=index, num_example_per_prompt=count)


def decode_row(rows, row_index: int, filters: PairFilter, skip_bad: bool) -> Pair | None:
    """``rows[row_index]`` as a pair with both images, or None when a filter drops it or, with
    ``skip_bad``, when it is bad (the caller's collate drops Nones); a bad row raises otherwise."""
    try:
        pair = decode_pair(rows[row_index], row_index, filters)
        if isinstance(pair, str):
            return None
        if pair.image_0 is None or pair.image_1 is None:
            raise BadRowError(row_index, "jpg_0", "missing image")
    except BadRowError:
        if skip_bad:
            return None
        raise
    return pair


def usable_rows(rows, filters: PairFilter) -> np.ndarray:
    """Indices of rows the filters keep, decided from the label columns alone."""
    names = rows.column_names
    columns = {c: rows[c] for c in ("has_label", "are_different", "label_0") if c in names}
    keep = np.ones(len(rows), dtype=bool)
    if filters.require_label and "has_label" in columns:
        keep &= np.array([bool(v) for v in columns["has_label"]])
    if filters.require_different and "are_different" in columns:
        keep &= np.array([v is None or bool(v) for v in columns["are_different"]])
    if not filters.keep_ties and "label_0" in columns:
        keep &= np.array([v != 0.5 for v in columns["label_0"]])
    return np.nonzero(keep)[0]


def iter_pairs(
    rows: Iterable[dict],
    filters: PairFilter | None = None,
    on_bad: BadRowPolicy = "error",
    report: DataReport | None = None,
) -> Iterator[Pair]:
    """Yield the usable pairs of ``rows``, updating ``report`` as it goes.

    ``on_bad="error"`` stops at the first bad row with a :class:`BadRowError`; ``"skip"`` skips
    it and counts it under ``report.bad[reason]``. Filtered rows are counted, never silent.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    report = report if report is not None else DataReport()
    for index, row in enumerate(rows):
        report.rows += 1
        try:
            pair = decode_pair(row, index, filters)
        except BadRowError as error:
            if on_bad == "error":
                raise
            report.bad[f"{error.reason} ({error.column})"] += 1
            continue
        if isinstance(pair, str):  # dropped by a filter: counted under its name
            report.dropped[pair] += 1
        else:
            report.pairs += 1
            report.ties += pair.is_tie
            yield pair


def inspect_split(
    source: str | Path,
    split: str = "train",
    skip_bad: bool = False,
    filters: PairFilter | None = None,
    progress: bool = True,
) -> DataReport:
    """Read a whole split and count rows, usable pairs, ties and bad rows by reason."""
    from tqdm.auto import tqdm

    dataset = load_pickapic(source, split)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    report = DataReport()
    rows = tqdm(dataset, total=total, desc=f"{split}", disable=not progress, leave=False)
    for _ in iter_pairs(rows, filters, "skip" if skip_bad else "error", report):
        pass
    return report


# ----------------------------------------------------------------------------------------------
# Writing


def pickapic_arrow_schema():
    """The pyarrow schema of the 19 Pick-a-Pic columns, in the Hub's column order."""
    import pyarrow as pa

    types = {
        "are_different": pa.bool_(),
        "created_at": pa.timestamp("ns"),
        "has_label": pa.bool_(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        "ranking_id": pa.int64(),
        "user_id": pa.int64(),
        "num_example_per_prompt": pa.int64(),
        "__index_level_0__": pa.int64(),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in PICKAPIC_COLUMNS])


def write_split(rows: list[dict], folder: str | Path, split: str) -> Path:
    """Write ``rows`` (dicts with the 19 columns) as ``folder/data/<split>-00000-of-00001.parquet``,
    the Hub layout, so ``load_pickapic(folder)`` and ``load_dataset("parquet", ...)`` read it.

    The file appears atomically. Missing columns are an error that names them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reward.runtime import atomic_path

    for index, row in enumerate(rows):
        missing = [c for c in PICKAPIC_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row {index} of split '{split}' lacks columns {missing}")
    schema = pickapic_arrow_schema()
    columns = {name: [row[name] for row in rows] for name in PICKAPIC_COLUMNS}
    table = pa.table(columns, schema=schema)
    path = Path(folder) / "data" / f"{split}-00000-of-00001.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
