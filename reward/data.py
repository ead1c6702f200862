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
import os
import re
import struct
import warnings
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
VALID_LABELS = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))
BadRowPolicy = Literal["error", "skip"]


class BadRowError(ValueError):
    """A row that cannot become a pair. Carries the row index, the column and the reason."""

    def __init__(self, index: int, column: str, reason: str, detail: str = ""):
        self.index, self.column, self.reason, self.detail = index, column, reason, detail
        message = f"bad row {index}, column '{column}': {reason}"
        super().__init__(f"{message} ({detail})" if detail else message)

    def __reduce__(self):  # crosses from DataLoader workers intact
        return type(self), (self.index, self.column, self.reason, self.detail)

    @property
    def key(self) -> str:
        """How a skipped row is counted: ``"<reason> (<column>)"``."""
        return f"{self.reason} ({self.column})"


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
class DatasetConfig:
    """Where a recipe's Pick-a-Pic data comes from, and what it does with bad rows (a config
    mixin)."""

    dataset: str = field(
        default="yuvalkirstain/pickapic_v2", metadata={"help": "Pick-a-Pic Hub id or local folder."}
    )
    dataset_build: str | None = field(
        default=None,
        metadata={
            "help": "The command that builds a local dataset (the toy configs set it): a missing "
            "dataset is then reported with it, never looked up on the Hub."
        },
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip and count bad rows instead of stopping."}
    )


@dataclass
class DataReport:
    """What happened to every row read: kept, filtered out (by filter) or bad (by reason)."""

    rows: int = 0
    pairs: int = 0
    ties: int = 0
    dropped: Counter = field(default_factory=Counter)  # "unlabeled", "not_different", "tie"
    bad: Counter = field(default_factory=Counter)  # "<reason> (<column>)"

    def with_bad_rows(self, bad_rows: dict[int, str]) -> DataReport:
        """This report plus rows found bad while training (``{row: reason}``, each row once)."""
        bad = self.bad + Counter(bad_rows.values())
        return DataReport(self.rows, self.pairs - len(bad_rows), self.ties, self.dropped, bad)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "pairs": self.pairs,
            "ties": self.ties,
            "dropped": dict(self.dropped),
            "bad": dict(self.bad),
        }

    def one_line(self) -> str:
        """``12 rows: 6 usable pairs (1 tie), dropped 2 (...), bad 4 (...)``."""

        def counts(counter: Counter) -> str:
            return ", ".join(f"{name} {count}" for name, count in sorted(counter.items()))

        line = f"{self.rows} rows: {self.pairs} usable pairs ({self.ties} ties)"
        if self.dropped:
            line += f"; dropped {sum(self.dropped.values())} ({counts(self.dropped)})"
        if self.bad:
            line += f"; bad {sum(self.bad.values())} ({counts(self.bad)})"
        return line

    def summary(self) -> str:
        lines = [
            f"rows read:        {self.rows}",
            f"usable pairs:     {self.pairs} (ties among them: {self.ties})",
            f"unlabeled rows:   {self.dropped['unlabeled']} (dropped)",
            f"identical images: {self.dropped['not_different']} (dropped)",
        ]
        if self.dropped["empty_caption"]:
            lines.append(f"empty captions:   {self.dropped['empty_caption']} (dropped)")
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


def first_rows(source: str | Path, split: str, rows: int):
    """The first ``rows`` rows of a Pick-a-Pic split as a map-style ``datasets.Dataset``, read
    by streaming and kept in the datasets cache: a Hub image set (hundreds of GB) is read only
    that far, once, and every process of a run shares the copy."""
    import datasets

    whole = load_pickapic(source, split, streaming=True)
    if isinstance(whole, datasets.Dataset):  # a save_to_disk folder: already on disk
        return whole.select(range(min(rows, len(whole))))
    path = Path(source)
    # A local folder's files may change under the same name: their sizes and times join the
    # cache's key.
    stamp = (
        sorted(
            (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()
        )
        if path.is_dir()
        else []
    )
    return datasets.Dataset.from_generator(
        _stream_rows,
        features=whole.features,
        gen_kwargs={"source": str(source), "split": split, "rows": rows, "stamp": repr(stamp)},
    )


def _stream_rows(source: str, split: str, rows: int, stamp: str) -> Iterator[dict]:
    from itertools import islice

    yield from islice(load_pickapic(source, split, streaming=True), rows)


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


# Pick-a-Pic images are 512 to 1024 px a side (about 1 megapixel); 32 megapixels is far above any
# of them and still decodes in well under a gigabyte of memory.
MAX_IMAGE_PIXELS = 32_000_000
MAX_ASPECT_RATIO = 20  # resizing the short side of a 1 x 100,000 strip would allocate gigabytes
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class BadImageError(ValueError):
    """An image that cannot be used: carries a short ``reason`` (``"image too large"``, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason} ({detail})" if detail else reason)

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


def max_image_pixels() -> int:
    """The pixel cap: ``PICKALIGN_MAX_IMAGE_PIXELS`` when set, else :data:`MAX_IMAGE_PIXELS`."""
    value = os.environ.get("PICKALIGN_MAX_IMAGE_PIXELS")
    if value is None:
        return MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"PICKALIGN_MAX_IMAGE_PIXELS must be a positive integer, got {value!r}")
    return int(value)


def decode_image(value: Any, max_pixels: int | None = None) -> Image.Image:
    """The one way pickalign reads an image: raw bytes, a ``datasets`` Image dict, a file path or
    a PIL image -> a loaded RGB image.

    The size is read from the header and checked before any pixel is decoded, so a decompression
    bomb (a small file declaring hundreds of megapixels) is refused at once. Every failure is a
    :class:`BadImageError` with a short reason: ``unsupported format``, ``image too large``,
    ``absurd size``, ``truncated image``, ``undecodable image``, ``not an image``.
    """
    max_pixels = max_pixels or max_image_pixels()
    if isinstance(value, Image.Image):
        _check_size(value.size, max_pixels)
        return to_rgb(value)
    if isinstance(value, dict):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        source = value
    else:
        raise BadImageError("not an image", f"got {type(value).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # PIL's own bomb check runs inside open(); ours (below) is the one that decides.
            Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)
            with Image.open(source, formats=IMAGE_FORMATS) as image:
                _check_size(image.size, max_pixels)
                image.load()
                return to_rgb(image)
        except BadImageError:
            raise
        except Image.DecompressionBombError as error:  # far over PIL's own limit
            declared = re.search(r"\((\d+) pixels\)", str(error))
            size = f"{int(declared[1]):,} pixels" if declared else "a decompression bomb"
            raise BadImageError("image too large", _over_cap(size, max_pixels)) from None
        except UnidentifiedImageError:
            raise _unidentified(source) from None
        except FileNotFoundError:
            raise
        except OSError as error:
            reason = "truncated image" if "truncated" in str(error).lower() else "undecodable image"
            raise BadImageError(reason, str(error)) from None
        except (ValueError, TypeError, SyntaxError, struct.error, EOFError, MemoryError) as error:
            raise BadImageError("undecodable image", f"{type(error).__name__}: {error}") from None


# Magic bytes of files that are not images PIL reads, so the reason can name them.
_SNIFFED = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"ftypheic", "HEIC"),
    (b"ftypavif", "AVIF"),
    (b"<html", "HTML"),
    (b"<!DOCTYPE", "HTML"),
)


def _unidentified(source) -> BadImageError:
    """Name the format PIL knows but pickalign does not read (header only), else undecodable."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with Image.open(source) as image:
            found = image.format
    except Exception:  # noqa: BLE001 - garbage bytes: PIL may raise anything here
        found = None
    if found is None and isinstance(source, io.BytesIO):  # formats PIL cannot even identify
        head = source.getvalue()[:64].lstrip()
        found = next((name for magic, name in _SNIFFED if magic in head[:32]), None)
    if found:
        return BadImageError("unsupported format", f"{found}; reads {', '.join(IMAGE_FORMATS)}")
    return BadImageError("undecodable image", f"not a {', '.join(IMAGE_FORMATS)} image")


def _over_cap(size: str, max_pixels: int) -> str:
    return f"{size}, over the cap of {max_pixels:,}; PICKALIGN_MAX_IMAGE_PIXELS raises it"


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        size = f"{width}x{height} = {width * height:,} pixels"
        raise BadImageError("image too large", _over_cap(size, max_pixels))
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImageError("absurd size", f"{width}x{height}")


def _required(row: dict, index: int, column: str) -> Any:
    if column not in row:
        raise BadRowError(index, column, "missing column")
    if row[column] is None:
        raise BadRowError(index, column, "null value")
    return row[column]


LABEL_COLUMNS = ("has_label", "are_different", "caption", "label_0", "label_1")


def check_labels(row: dict, index: int, filters: PairFilter) -> tuple[str, float, float] | str:
    """The label part of a row, read without its images: ``(prompt, label_0, label_1)``, or the
    name of the filter that drops a well-formed row (``"unlabeled"``, ``"not_different"``,
    ``"empty_caption"``, ``"tie"``). A malformed row raises :class:`BadRowError`."""
    if filters.require_label and not _required(row, index, "has_label"):
        return "unlabeled"
    if filters.require_different and not _required(row, index, "are_different"):
        return "not_different"
    prompt = _required(row, index, "caption")
    if not isinstance(prompt, str):
        raise BadRowError(index, "caption", "not a string", type(prompt).__name__)
    if not prompt.strip():
        return "empty_caption"
    try:
        labels = (float(_required(row, index, "label_0")), float(_required(row, index, "label_1")))
    except (TypeError, ValueError) as error:
        raise BadRowError(index, "label_0", "invalid labels", str(error)) from error
    if labels not in VALID_LABELS:  # NaN compares unequal to everything: invalid too
        raise BadRowError(index, "label_0/label_1", "invalid labels", f"got {labels}")
    if labels == (0.5, 0.5) and not filters.keep_ties:
        return "tie"
    return prompt, *labels


def decode_pair(
    row: dict, index: int, filters: PairFilter | None = None, max_pixels: int | None = None
) -> Pair | str:
    """Turn one row into a :class:`Pair`.

    Returns the name of the filter that dropped it (see :func:`check_labels`) for a well-formed
    row the filters exclude, and raises :class:`BadRowError` for a malformed one.
    """
    checked = check_labels(row, index, filters or PairFilter())
    if isinstance(checked, str):
        return checked
    prompt, label_0, label_1 = checked
    count = row.get("num_example_per_prompt")
    if count is None:
        count = 1
    elif isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise BadRowError(index, "num_example_per_prompt", "not a positive integer", repr(count))
    images = []
    has_images = "jpg_0" in row or "jpg_1" in row  # the _no_images variants have URLs only
    for column in ("jpg_0", "jpg_1"):
        if not has_images:
            images.append(None)
            continue
        value = _required(row, index, column)
        if isinstance(value, str):  # never a path: a dataset row carries the image itself
            raise BadRowError(index, column, "not image bytes", "got a string")
        try:
            images.append(decode_image(value, max_pixels))
        except BadImageError as error:
            raise BadRowError(index, column, error.reason, error.detail) from None
    return Pair(prompt, images[0], images[1], label_0, label_1, index, int(count))


def decode_row(rows, row_index: int, filters: PairFilter, skip_bad: bool) -> Pair | BadRowError:
    """``rows[row_index]`` as a pair with both images. A bad row raises, or with ``skip_bad``
    comes back as its :class:`BadRowError` for the caller to count (datasets hand it on, and
    :func:`split_bad` separates it from the good items in a collate)."""
    try:
        pair = decode_pair(rows[row_index], row_index, filters)
        if isinstance(pair, str):  # the label columns were filtered up front: not expected
            raise BadRowError(row_index, "label_0", "filtered row", pair)
        if pair.image_0 is None or pair.image_1 is None:
            raise BadRowError(row_index, "jpg_0", "missing image")
    except BadRowError as error:
        if skip_bad:
            return error
        raise
    return pair


def split_bad(items: list) -> tuple[list, dict[int, str]]:
    """A collate's items without the skipped bad rows, and those rows as ``{row: reason}``."""
    bad = {item.index: item.key for item in items if isinstance(item, BadRowError)}
    return [item for item in items if not isinstance(item, BadRowError)], bad


def usable_rows(
    rows, filters: PairFilter, skip_bad: bool = False, report: DataReport | None = None
) -> np.ndarray:
    """Indices of the rows whose labels make a pair, read from the label columns alone (no image
    is decoded). Filtered rows are counted in ``report.dropped``; rows with bad labels raise, or
    with ``skip_bad`` are counted in ``report.bad``. Images are checked later, row by row."""
    report = report if report is not None else DataReport()
    columns = {c: rows[c] for c in LABEL_COLUMNS if c in rows.column_names}  # one read each
    keep = []
    for index in range(len(rows)):
        row = {name: values[index] for name, values in columns.items()}
        report.rows += 1
        try:
            checked = check_labels(row, index, filters)
        except BadRowError as error:
            if not skip_bad:
                raise
            report.bad[error.key] += 1
            continue
        if isinstance(checked, str):
            report.dropped[checked] += 1
        else:
            report.ties += checked[1] == checked[2]
            keep.append(index)
    report.pairs = len(keep)
    return np.asarray(keep, dtype=np.int64)


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
            report.bad[error.key] += 1
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


def unique_prompt_rows(rows: list[dict]) -> list[dict]:
    """One row per prompt (the first), num_example_per_prompt 1: the ``*_unique`` splits."""
    seen, unique = set(), []
    for row in rows:
        if row["caption"] not in seen:
            seen.add(row["caption"])
            unique.append({**row, "num_example_per_prompt": 1})
    return unique


def write_split(rows: list[dict], folder: str | Path, split: str) -> Path:
    """Write ``rows`` (dicts with the 19 columns) as ``folder/data/<split>-00000-of-00001.parquet``,
    the Hub layout, so ``load_pickapic(folder)`` and ``load_dataset("parquet", ...)`` read it.

    The file appears atomically. Missing columns are an error that names them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pickalign.runtime import atomic_path

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
