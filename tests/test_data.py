from datetime import datetime

import pytest
from PIL import Image

from pickalign.cli import main as cli
from pickalign.reward.data import (
    PICKAPIC_COLUMNS,
    BadRowError,
    DataReport,
    PairFilter,
    inspect_split,
    iter_pairs,
    load_pickapic,
    to_rgb,
    write_split,
)
from tests.conftest import jpeg_bytes

RED = Image.new("RGB", (24, 16), (220, 20, 20))
BLUE = Image.new("RGB", (16, 24), (20, 20, 220))


def make_row(index, caption="a red box", jpg_0=None, jpg_1=None, labels=(1.0, 0.0), **overrides):
    row = {
        "are_different": True,
        "best_image_uid": f"{index}-0",
        "caption": caption,
        "created_at": datetime(2023, 5, 1),
        "has_label": True,
        "image_0_uid": f"{index}-0",
        "image_0_url": f"https://example.invalid/{index}-0.jpg",
        "image_1_uid": f"{index}-1",
        "image_1_url": f"https://example.invalid/{index}-1.jpg",
        "jpg_0": jpeg_bytes(RED) if jpg_0 is None else jpg_0,
        "jpg_1": jpeg_bytes(BLUE) if jpg_1 is None else jpg_1,
        "label_0": labels[0],
        "label_1": labels[1],
        "model_0": "sd-1.5",
        "model_1": "sdxl",
        "ranking_id": index,
        "user_id": 7,
        "num_example_per_prompt": 2,
        "__index_level_0__": index,
    }
    row.update(overrides)
    return row


def messy_rows():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    return [
        make_row(0),  # good
        make_row(1, labels=(0.5, 0.5)),  # tie
        make_row(2, has_label=False, labels=(0.0, 0.0)),  # unlabeled
        make_row(3, jpg_1=b"\xff\xd8 these are not jpeg bytes"),  # corrupt image
        make_row(4, labels=(1.0, 1.0)),  # not a valid label pair
        make_row(5, jpg_0=jpeg_bytes(rgba, "PNG"), labels=(0.0, 1.0)),  # RGBA
        make_row(6, jpg_0=jpeg_bytes(RED.convert("L"))),  # greyscale
        make_row(7, jpg_1=jpeg_bytes(BLUE.convert("CMYK"))),  # CMYK JPEG
        make_row(8, jpg_0=jpeg_bytes(palette, "PNG")),  # palette
        make_row(9, caption=None),  # null required column
        make_row(10, are_different=False),  # identical images
        make_row(11, labels=(0.3, 0.7)),  # not a valid label pair
    ]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickapic")
    write_split(messy_rows(), folder, "train")
    write_split([make_row(i) for i in range(3)], folder, "validation_unique")
    return folder


def test_written_dataset_has_the_19_columns_and_reads_with_load_dataset(messy):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(messy / "data/train-*.parquet"))["train"]
    assert tuple(ds.column_names) == PICKAPIC_COLUMNS and len(PICKAPIC_COLUMNS) == 19
    assert len(ds) == 12


def test_error_policy_names_the_row_and_column(messy):
    with pytest.raises(BadRowError, match=r"bad row 3, column 'jpg_1': undecodable image"):
        list(iter_pairs(load_pickapic(messy, "train")))


def test_skip_policy_counts_every_row_by_reason(messy):
    report = DataReport()
    pairs = list(iter_pairs(load_pickapic(messy, "train"), on_bad="skip", report=report))
    assert [p.index for p in pairs] == [0, 1, 5, 6, 7, 8]
    assert report.rows == 12 and report.pairs == 6 and report.ties == 1
    assert report.dropped == {"unlabeled": 1, "not_different": 1}
    assert report.bad == {
        "undecodable image (jpg_1)": 1,
        "invalid labels (label_0/label_1)": 2,
        "null value (caption)": 1,
    }


def test_pairs_decode_to_rgb_with_labels(messy):
    pairs = list(iter_pairs(load_pickapic(messy, "train"), on_bad="skip"))
    assert all(p.image_0.mode == p.image_1.mode == "RGB" for p in pairs)
    first = pairs[0]
    assert (first.prompt, first.label_0, first.label_1) == ("a red box", 1.0, 0.0)
    assert first.image_0.size == (24, 16) and first.num_example_per_prompt == 2
    rgba_pair = pairs[2]
    assert rgba_pair.image_0.getpixel((0, 0)) == (255, 255, 255)  # alpha composited on white
    red = pairs[3].image_0.getpixel((5, 5))  # greyscale in, RGB out
    assert red[0] == red[1] == red[2]


def test_filters_drop_ties_and_keep_unlabeled(messy):
    report = DataReport()
    filters = PairFilter(keep_ties=False, require_label=False)
    rows = load_pickapic(messy, "train")
    list(iter_pairs(rows, filters, on_bad="skip", report=report))
    assert report.dropped["tie"] == 1 and report.dropped["unlabeled"] == 0
    # unlabeled row 2 has labels (0, 0): kept by the filter, it is now a bad label pair
    assert report.bad["invalid labels (label_0/label_1)"] == 3


def test_missing_column_is_named(tmp_path):
    rows = [make_row(0)]
    del rows[0]["label_1"]
    with pytest.raises(BadRowError, match="bad row 0, column 'label_1': missing column"):
        list(iter_pairs(rows))


def test_no_images_variant_gives_pairs_without_images():
    row = make_row(0)
    del row["jpg_0"], row["jpg_1"]
    (pair,) = iter_pairs([row])
    assert pair.image_0 is None and pair.label_0 == 1.0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F"])
def test_every_image_mode_becomes_rgb(mode):
    assert to_rgb(Image.new(mode, (4, 4))).mode == "RGB"


def test_unknown_split_and_missing_folder_split(messy):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_pickapic(messy, "dev")
    with pytest.raises(FileNotFoundError, match="no files for split 'test'"):
        load_pickapic(messy, "test")


def test_other_local_layouts(tmp_path):
    import datasets

    rows = [make_row(i) for i in range(3)]
    flat = tmp_path / "flat"
    flat.mkdir()
    write_split(rows, tmp_path / "hub", "test")
    (tmp_path / "hub/data/test-00000-of-00001.parquet").rename(flat / "test.parquet")
    assert len(list(iter_pairs(load_pickapic(flat, "test")))) == 3
    streamed = load_pickapic(flat, "test", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert len(list(iter_pairs(streamed))) == 3
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(saved)
    assert len(list(iter_pairs(load_pickapic(saved, "test")))) == 3


def test_inspect_cli_stops_on_bad_rows_unless_skipping(messy, capsys):
    assert cli(["data", "inspect", str(messy)]) == 1
    assert "bad row 3, column 'jpg_1'" in capsys.readouterr().err
    assert cli(["data", "inspect", str(messy), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "rows read:        12" in out and "usable pairs:     6 (ties among them: 1)" in out
    assert "unlabeled rows:   1" in out and "bad rows:         4" in out
    assert "undecodable image (jpg_1): 1" in out and "null value (caption): 1" in out


def test_inspect_reports_every_split_asked(messy, capsys):
    assert cli(["data", "inspect", str(messy), "--split", "validation_unique"]) == 0
    assert "usable pairs:     3" in capsys.readouterr().out
    report = inspect_split(messy, "validation_unique", progress=False)
    assert report.pairs == 3 and not report.bad


def test_first_rows_reads_a_split_only_that_far(tmp_path, monkeypatch):
    from pickalign.reward import data

    write_split([make_row(i, caption=f"prompt {i}") for i in range(40)], tmp_path, "train")
    pulled, load = [], data.load_pickapic

    def counted(*args, **kwargs):  # every row the stream hands out
        return load(*args, **kwargs).map(lambda row: pulled.append(row["caption"]) or row)

    monkeypatch.setattr(data, "load_pickapic", counted)
    rows = data.first_rows(tmp_path, "train", 6)
    assert rows.column_names == list(PICKAPIC_COLUMNS)
    assert rows["caption"] == pulled == [f"prompt {i}" for i in range(6)]
    assert next(iter_pairs(rows)).image_0.size == (24, 16)  # the image bytes came along
    pulled.clear()
    assert data.first_rows(tmp_path, "train", 6)["caption"] == rows["caption"]
    assert pulled == []  # from the cache: not read again
    write_split([make_row(i, caption=f"new {i}") for i in range(40)], tmp_path, "train")
    again = data.first_rows(tmp_path, "train", 6)  # the folder changed: read again
    assert again["caption"] == [f"new {i}" for i in range(6)]
