"""Bad input at every entry point: hostile rows are counted or named, never a traceback; configs
are refused before anything loads; the wrong kind of folder is named; CLI errors are one line."""

import math
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pickalign.align.dpo import DPOConfig
from pickalign.align.dpo import train as dpo_train
from pickalign.cli import main as cli
from pickalign.config import ConfigError, parse_config
from pickalign.eval.toy.judge import ToyJudgeConfig
from pickalign.reward.data import (
    BadImageError,
    DataReport,
    PairFilter,
    decode_image,
    iter_pairs,
    load_pickapic,
    write_split,
)
from pickalign.reward.train import PairDataset, RewardConfig, make_collate, train
from pickalign.runtime import run_cli
from tests.conftest import REPO, jpeg_bytes
from tests.test_data import make_row

RED = Image.new("RGB", (64, 48), (220, 20, 20))


def png_bomb(side: int = 20_000) -> bytes:
    """A real decompression bomb: a ~0.4 MB PNG that decodes to side x side greyscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte + zero pixels
    data = b"".join(compressor.compress(row * 500) for _ in range(side // 500))
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str) -> bytes:
    return jpeg_bytes(image, fmt)


def hostile_rows() -> tuple[list[dict], dict[int, str]]:
    """Rows with what a scraped preference dataset holds, and each row's fate: ``"pair"``,
    ``"dropped: <filter>"`` or ``"bad: <reason (column)>"``."""
    truncated = jpeg_bytes(Image.effect_noise((256, 256), 64).convert("RGB"))
    fates = {}
    rows = []

    def add(fate, **row):
        fates[len(rows)] = fate
        rows.append(make_row(len(rows), **row))

    add("pair")
    add("bad: image too large (jpg_0)", jpg_0=png_bomb())
    add("bad: truncated image (jpg_1)", jpg_1=truncated[: len(truncated) // 3])
    add("bad: undecodable image (jpg_0)", jpg_0=b"\x00\x01 not an image at all")
    add("bad: undecodable image (jpg_1)", jpg_1=b"")
    add("bad: invalid labels (label_0/label_1)", labels=(math.nan, 1.0))
    add("bad: invalid labels (label_0/label_1)", labels=(math.nan, math.nan))
    add("bad: null value (jpg_0)", jpg_0=None)
    add("dropped: empty_caption", caption="")
    add("dropped: empty_caption", caption="  \t\n ")
    add("pair", caption="a red box " * 20_000)  # 200k characters: truncated to 77 tokens
    add("pair", caption="a red\x00 box\x07 with \x1b[31mcontrol\r characters\u200b\ufeff")
    add("pair", jpg_0=encoded(RED, "PNG"), jpg_1=encoded(RED, "WEBP"))
    add("pair", jpg_0=encoded(RED, "GIF"), jpg_1=encoded(RED, "BMP"))
    add("pair", jpg_1=encoded(RED, "TIFF"))
    add("bad: unsupported format (jpg_0)", jpg_0=encoded(RED, "ICO"))
    add("bad: unsupported format (jpg_1)", jpg_1=encoded(RED, "PDF"))
    add("bad: absurd size (jpg_0)", jpg_0=encoded(Image.new("RGB", (4000, 2), "red"), "PNG"))
    rows[7]["jpg_0"] = None  # make_row fills None with a default image
    return rows, fates


def expected_report(fates: dict[int, str]) -> DataReport:
    report = DataReport(rows=len(fates))
    for fate in fates.values():
        if fate == "pair":
            report.pairs += 1
        elif fate.startswith("dropped: "):
            report.dropped[fate.removeprefix("dropped: ")] += 1
        else:
            report.bad[fate.removeprefix("bad: ")] += 1
    return report


def accounting(report: DataReport) -> tuple:
    """Every row's fate: (rows, usable pairs, dropped by filter, bad by reason)."""
    return report.rows, report.pairs, report.dropped, report.bad


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    rows, fates = hostile_rows()
    write_split(rows, folder, "train")
    return folder, fates


def test_every_hostile_row_is_a_pair_or_has_a_reason_in_the_data_layer(hostile):
    folder, fates = hostile
    report = DataReport()
    pairs = list(iter_pairs(load_pickapic(folder, "train"), on_bad="skip", report=report))
    assert [p.index for p in pairs] == [i for i, fate in fates.items() if fate == "pair"]
    expected = expected_report(fates)
    assert accounting(report) == accounting(expected)


def test_bomb_and_truncated_rows_are_named_under_the_error_policy(hostile):
    folder, _ = hostile
    rows = load_pickapic(folder, "train")
    first_bad = [rows[0], rows[1]]
    with pytest.raises(Exception, match=r"bad row 1, column 'jpg_0': image too large"):
        list(iter_pairs(first_bad))
    with pytest.raises(Exception, match=r"bad row 2, column 'jpg_1': truncated image"):
        list(iter_pairs([rows[0], rows[0], rows[2]]))  # row numbers are positions


def test_inspect_cli_counts_hostile_rows_under_skip(hostile, capsys):
    folder, fates = hostile
    assert cli(["data", "inspect", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "bad row 1, column 'jpg_0': image too large" in err and "Traceback" not in err
    assert cli(["data", "inspect", str(folder), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    expected = expected_report(fates)
    assert f"rows read:        {len(fates)}" in out
    assert f"usable pairs:     {expected.pairs} " in out
    assert f"empty captions:   {expected.dropped['empty_caption']} (dropped)" in out
    assert f"bad rows:         {sum(expected.bad.values())}" in out
    for reason, count in expected.bad.items():
        assert f"  {reason}: {count}" in out


def test_reward_data_path_accounts_for_every_hostile_row(hostile, tiny_models):
    from transformers import CLIPProcessor

    folder, fates = hostile
    processor = CLIPProcessor.from_pretrained(tiny_models["clip"])
    dataset = PairDataset(load_pickapic(folder, "train"), processor, PairFilter(), skip_bad=True)
    batch = make_collate(processor.tokenizer)([dataset[i] for i in range(len(dataset))])
    report = dataset.report.with_bad_rows(batch["bad_rows"])
    expected = expected_report(fates)
    assert accounting(report) == accounting(expected)
    assert batch["input_ids"].shape == (expected.pairs, 77)  # the long caption is truncated


def test_decode_refuses_a_bomb_from_its_header():
    with pytest.raises(BadImageError, match=r"image too large \(400,000,000 pixels"):
        decode_image(png_bomb())
    with pytest.raises(BadImageError, match="image too large"):
        decode_image(jpeg_bytes(RED), max_pixels=1000)
    assert decode_image(jpeg_bytes(RED)).size == (64, 48)


def test_score_on_a_bomb_file_is_one_line_and_a_nonzero_exit(tmp_path, tiny_models, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes(RED))
    args = ["score", "--model", str(tiny_models["clip"]), "--prompt", "a red box"]
    assert cli([*args, str(good), str(bomb)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bomb) in err and "image too large" in err
    assert cli([*args, str(good)]) == 0


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_nonpositive_max_steps_is_refused_before_anything_loads(steps, tmp_path, capsys):
    config = str(REPO / "recipes/configs/reward/toy.yaml")
    # The model does not exist: reaching any loader would fail on it instead.
    argv = ["--config", config, "--max_steps", steps, "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda argv: train(parse_config(RewardConfig, argv)), argv + ["--model", "/nope"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: max_steps: got {steps}, expected > 0") and "\n" not in err
    with pytest.raises(SystemExit):
        dpo_main(
            "sd", ["--config", str(REPO / "recipes/configs/dpo/toy_sd.yaml"), "--max_steps", steps]
        )
    assert f"max_steps: got {steps}, expected > 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_config_values_and_combinations_name_field_value_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"mode: got 'qlora', expected one of lora, full"):
        DPOConfig(mode="qlora")
    with pytest.raises(ConfigError, match=r"caption_dropout: got 1.5, expected \[0, 1\)"):
        DPOConfig(caption_dropout=1.5)
    with pytest.raises(ConfigError, match=r"learning_rate: got 0.0, expected > 0"):
        RewardConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"lr_scheduler: got 'cosine_annealing'"):
        DPOConfig(lr_scheduler="cosine_annealing")
    with pytest.raises(ConfigError, match=r"uncond_anchor: got 10.0, but caption_dropout is 0"):
        DPOConfig(uncond_anchor=10.0)
    with pytest.raises(ConfigError, match=r"reference_offload: applies to mode full only"):
        DPOConfig(reference_offload=True)
    assert DPOConfig(lora_alpha=None, validation_split="none").validation_split is None


def dpo_main(family: str, argv: list[str]):
    """What recipes/dpo.py runs for ``family`` (the toy judging is off unless a config asks)."""
    config, _ = parse_config((DPOConfig, ToyJudgeConfig), argv)
    return dpo_train(config, family)


def _recipe_error(recipe, argv, capsys) -> str:
    assert run_cli(recipe, argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_recipes_name_the_wrong_kind_of_folder(tiny_models, tmp_path, capsys):
    reward = lambda argv: train(parse_config(RewardConfig, argv))  # noqa: E731
    dpo = lambda argv: dpo_main("sd", argv)  # noqa: E731
    base = ["--output_dir", str(tmp_path / "out"), "--dataset", str(tmp_path)]
    err = _recipe_error(reward, [*base, "--model", str(tiny_models["sd"])], capsys)
    assert "model: " in err and "holds a diffusers pipeline" in err and "CLIP model" in err
    err = _recipe_error(dpo, [*base, "--model", str(tiny_models["clip"])], capsys)
    assert "holds a CLIP model" in err and "expected a diffusers pipeline" in err
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    err = _recipe_error(dpo, [*base, "--model", str(lora)], capsys)
    assert "holds LoRA weights" in err and "expected a diffusers pipeline" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _recipe_error(dpo, [*base, "--model", str(empty)], capsys)
    assert "holds an empty folder" in err


def test_a_missing_toy_dataset_names_the_command_that_builds_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no outputs/ yet
    reward = lambda argv: train(parse_config(RewardConfig, argv))  # noqa: E731
    config = str(REPO / "recipes/configs/reward/toy.yaml")
    clip = str(REPO / "eval/toy/assets/clip")  # the config names it from the repository root
    err = _recipe_error(reward, ["--config", config, "--model", clip], capsys)
    assert "dataset: outputs/toy_dpo_data does not exist" in err
    assert "build it with: pickalign toy data --out outputs/toy_dpo_data" in err
    assert not Path("outputs").exists()
    dpo = lambda argv: dpo_main("sdxl", argv)  # noqa: E731
    config = str(REPO / "recipes/configs/dpo/toy_sdxl.yaml")
    err = _recipe_error(
        dpo, ["--config", config, "--model", str(REPO / "eval/toy/assets/sdxl")], capsys
    )
    assert "build it with: pickalign toy data --out outputs/toy_dpo_data" in err


def test_errors_are_one_line_and_tracebacks_need_debug(monkeypatch, capsys):
    def broken(argv):
        raise RuntimeError("something\nwent wrong")

    assert run_cli(broken, []) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "error: RuntimeError: something went wrong (traceback: --debug or PICKALIGN_DEBUG=1)\n"
    )
    assert cli(["toy", "eval", "no/such/pipeline"]) == 1
    assert "model: no/such/pipeline does not exist" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        run_cli(broken, ["--debug"])
    monkeypatch.setenv("PICKALIGN_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_cli(broken, [])
