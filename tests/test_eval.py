"""The evaluation suite: paired generation, resume, processes, scorers, figures, the report."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pickalign.align.lora import WEIGHT_NAME
from tests.conftest import REPO, chrome, eval_config, launch


def brightness(prompts, images):
    """A plug-in scorer: mean pixel value in [0, 1]."""
    return [float(np.asarray(image, dtype=float).mean() / 255) for image in images]


def wrong_count(prompts, images):
    return [0.0]


def write_config(tmp_path, tiny_models, **overrides) -> Path:
    import yaml

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle on a blue background\na blue square on a white background\n"
        "a green triangle on a black background\n"
    )
    config = {
        "prompts": str(prompts),
        "seeds_per_prompt": 2,
        "steps": 3,
        "output_dir": str(tmp_path / "eval"),
        "models": [
            {"name": "base", "model": str(tiny_models["sd"])},
            {"name": "again", "model": str(tiny_models["sd"])},
            {"name": "hotter", "model": str(tiny_models["sd"]), "guidance_scale": 9.0},
        ],
        "scorers": {"bright.v2": "tests.test_eval:brightness", "oracle": "toy-oracle"},
        "grid_prompts": 4,
        **overrides,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def records(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for log in sorted((out / "generation").glob("rank*.jsonl"))
        for line in log.read_text().splitlines()
    ]


@pytest.fixture
def evaluated(tiny_evaluation):
    """The shared small evaluation (conftest), for the tests that only read it."""
    return tiny_evaluation


def pixels(out: Path, path: str) -> np.ndarray:
    return np.asarray(Image.open(out / path), dtype=np.int16)


def test_seeds_are_paired_across_models(evaluated):
    manifest = [json.loads(x) for x in (evaluated / "manifest.jsonl").read_text().splitlines()]
    by_model = {}
    for row in manifest:
        by_model.setdefault(row["model"], []).append(row)
    assert list(by_model) == ["base", "again", "hotter"] and len(by_model["base"]) == 6
    for rows in zip(*by_model.values()):
        assert len({(r["index"], r["prompt"], r["seed"]) for r in rows}) == 1
    assert [r["seed"] for r in by_model["base"]] == list(range(6))
    assert [r["prompt"] for r in by_model["base"]][:2] == ["a red circle on a blue background"] * 2
    # the same pipeline twice: the same noise gives the same images, item by item
    for a, b in zip(by_model["base"], by_model["again"]):
        assert np.array_equal(pixels(evaluated, a["path"]), pixels(evaluated, b["path"]))
    # and the items differ from each other (different seeds), as does the other guidance
    first = pixels(evaluated, by_model["base"][0]["path"])
    assert not np.array_equal(first, pixels(evaluated, by_model["base"][1]["path"]))
    assert not np.array_equal(first, pixels(evaluated, by_model["hotter"][0]["path"]))


def test_the_plug_in_scorer_and_the_means(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    for model in ("base", "again", "hotter"):
        rows = [r for r in results["images"] if r["model"] == model]
        expected = brightness(None, [Image.open(evaluated / r["path"]) for r in rows])
        assert [r["scores"]["bright.v2"] for r in rows] == pytest.approx(expected)
        mean = results["means"][model]["bright.v2"]
        assert mean["mean"] == pytest.approx(np.mean(expected))
        assert mean["low"] <= mean["mean"] <= mean["high"] and mean["n"] == 6
    # identical images: every item a tie
    same = results["win_rates"]["bright.v2"]["base"]["again"]
    assert same["estimate"] == 0.5 and same["ties"] == 6


def test_a_plug_in_scorer_must_give_one_score_per_image(tiny_models, tmp_path):
    from pickalign.eval.suite import evaluate

    config = eval_config(
        write_config(tmp_path, tiny_models, scorers={"bad": "tests.test_eval:wrong_count"})
    )
    config.models = config.models[:1]
    with pytest.raises(ValueError, match="gave 1 scores for"):
        evaluate(config, progress=False)


def test_win_rates_are_symmetric_and_inside_their_intervals():
    from pickalign.eval.results import score_figures

    rng = np.random.default_rng(0)
    prompts = [f"p{k // 2}" for k in range(40)]
    scores = {m: {"s": np.round(rng.normal(shift, 1, 40))} for m, shift in (("a", 0.3), ("b", 0))}
    rates = score_figures(scores, prompts)["win_rates"]["s"]
    ab, ba = rates["a"]["b"], rates["b"]["a"]
    assert ab["estimate"] == pytest.approx(1 - ba["estimate"])
    assert ab["low"] == pytest.approx(1 - ba["high"]) and ab["high"] == pytest.approx(1 - ba["low"])
    assert ab["low"] <= ab["estimate"] <= ab["high"] and ab["low"] < ab["high"]
    assert ab["wins"] == ba["losses"] and ab["ties"] == ba["ties"] and ab["ties"] > 0
    manual = np.mean(
        np.where(scores["a"]["s"] > scores["b"]["s"], 1.0, 0.0)
        + 0.5 * (scores["a"]["s"] == scores["b"]["s"])
    )
    assert ab["estimate"] == pytest.approx(manual)


def test_human_win_rates_from_a_judgments_table():
    import pandas as pd

    from pickalign.eval.results import human_win_rates

    manifest = [
        {"model": m, "path": f"images/{m}/{k:05d}.png", "prompt": f"p{k}"}
        for m in ("a", "b")
        for k in range(3)
    ]
    judgments = pd.DataFrame(
        {
            "prompt": ["p0", "p1", "p2", "p0"],
            "image_0": [
                "images/a/00000.png",
                "images/b/00001.png",
                "images/a/00002.png",
                "images/b/00000.png",
            ],
            "image_1": [
                "images/b/00000.png",
                "images/a/00001.png",
                "images/b/00002.png",
                "images/a/00000.png",
            ],
            "label_0": [1, 0, 0.5, 0],  # a wins, a wins (shown right), tie, a wins (shown right)
        }
    )
    human = human_win_rates(judgments, manifest)
    assert human["judgments"] == 4
    a_over_b = human["win_rates"]["a"]["b"]
    assert a_over_b["estimate"] == pytest.approx(3.5 / 4)
    assert (a_over_b["wins"], a_over_b["ties"], a_over_b["losses"]) == (3, 1, 0)
    assert human["win_rates"]["b"]["a"]["estimate"] == pytest.approx(0.5 / 4)
    judgments.loc[1, "prompt"] = "p2"  # a judgment made for another image than this one
    with pytest.raises(ValueError, match="was judged for 'p2'"):
        human_win_rates(judgments, manifest)
    judgments.loc[1, "prompt"] = "p1"
    judgments.loc[0, "image_0"] = "images/c/00000.png"
    with pytest.raises(ValueError, match="not in this evaluation's manifest"):
        human_win_rates(judgments, manifest)
    with pytest.raises(ValueError, match="missing column"):
        human_win_rates(judgments.drop(columns=["label_0"]), manifest)


def test_a_resumed_generation_skips_finished_images_and_gives_the_same_manifest(
    tiny_models, tmp_path
):
    from pickalign.eval.suite import evaluate

    config = eval_config(write_config(tmp_path, tiny_models))
    out = Path(config.output_dir)
    evaluate(config, progress=False)
    manifest = (out / "manifest.jsonl").read_text()
    written = len(records(out))
    assert written == 18
    before = {p: pixels(out, p) for p in ("images/again/00003.png", "images/hotter/00005.png")}
    for path in before:  # as if the run had died before these two
        (out / path).unlink()
    stamp = {p: (out / p).stat().st_mtime_ns for p in ("images/base/00000.png",)}
    evaluate(config, progress=False)
    assert len(records(out)) == written + 2  # only the two missing images were made again
    assert (out / "images/base/00000.png").stat().st_mtime_ns == stamp["images/base/00000.png"]
    assert (out / "manifest.jsonl").read_text() == manifest
    for path, image in before.items():
        # the same seed again; only batch-size-dependent float rounding may differ
        assert np.abs(pixels(out, path) - image).max() <= 2
    # an older log of another process count, for another prompt, read after the newer one
    stale = {**records(out)[0], "prompt": "an older prompt", "written": 1.0}
    (out / "generation" / "rank9.jsonl").write_text(json.dumps(stale) + "\n")
    # a model whose settings changed is made again, and only that one
    config.models[2].guidance_scale = 7.0
    seen = records(out)
    evaluate(config, progress=False)
    again = [r for r in records(out) if r not in seen]
    assert sorted((r["model"], r["index"]) for r in again) == [("hotter", k) for k in range(6)]
    assert (out / "images/base/00000.png").stat().st_mtime_ns == stamp["images/base/00000.png"]


@pytest.mark.integration
def test_two_processes_write_each_image_exactly_once(tiny_models, tmp_path):
    config = write_config(tmp_path, tiny_models)
    launch("cpu_2proc.yaml", str(REPO / "recipes" / "evaluate.py"), "--config", str(config))
    out = tmp_path / "eval"
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    made = [(r["model"], r["index"]) for r in records(out)]
    assert sorted(made) == sorted((m, k) for m in ("base", "again", "hotter") for k in range(6))
    assert {r["process"] for r in records(out)} == {0, 1}
    assert len(results["images"]) == 18


def _refused(capsys, path, *overrides) -> str:
    """parse_config's one-line refusal (exit status 2) of an eval config."""
    with pytest.raises(SystemExit) as stop:
        eval_config(path, *overrides)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_config_errors_name_the_field(tiny_models, tmp_path, capsys):
    path = write_config(tmp_path, tiny_models)
    assert "promts" in _refused(capsys, path, "--promts", "toy")
    twice = write_config(tmp_path, tiny_models, models=[{"name": "a", "model": "x"}] * 2)
    assert "names must differ" in _refused(capsys, twice)
    typo = write_config(
        tmp_path, tiny_models, models=[{"name": "a", "model": "x", "lora_sacle": 1}]
    )
    assert re.search(r"unknown key\(s\) \['lora_sacle'\]", _refused(capsys, typo))
    for name in ("../a", ".."):
        bad = write_config(tmp_path, tiny_models, models=[{"name": name, "model": "x"}])
        assert "must be letters" in _refused(capsys, bad)
    path = write_config(tmp_path, tiny_models)
    assert eval_config(path, "--max_prompts", "2").max_prompts == 2
    # mappings and lists of entries override as YAML on the command line too
    config = eval_config(path, "--runs", "{dpo: out/dpo}", "--models", "[{name: a, model: m}]")
    assert config.runs == {"dpo": "out/dpo"} and [m.name for m in config.models] == ["a"]
    assert "--runs: not YAML" in _refused(capsys, path, "--runs", "{a: [")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_prompt_tables(tmp_path, suffix):
    import pandas as pd

    from pickalign.align.prompts import load_prompts

    table = pd.DataFrame({"id": [1, 2, 3, 4], "Prompt": ["a cat", "a dog", "a cat", " "]})
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".parquet":
        table.to_parquet(path)
    elif suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(table["Prompt"].tolist()))  # a list of strings
    else:
        table.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    assert load_prompts(str(path)) == ["a cat", "a dog"]
    if suffix == ".csv":
        with pytest.raises(ValueError, match="no column 'caption'"):
            load_prompts(f"{path}:caption")
        table.rename(columns={"Prompt": "words"}).to_csv(path, index=False)
        with pytest.raises(ValueError, match="name one as FILE:COLUMN"):
            load_prompts(str(path))
        assert load_prompts(f"{path}:words") == ["a cat", "a dog"]
    if suffix == ".json":  # columns as lists; anything else is named
        path.write_text(json.dumps({"id": [1, 2], "caption": ["a cow", "a hen"]}))
        assert load_prompts(str(path)) == ["a cow", "a hen"]
        path.write_text(json.dumps({"prompts": "a cow"}))
        with pytest.raises(ValueError, match="expected a list of strings or of rows"):
            load_prompts(str(path))


def test_clip_and_aesthetic_scores_by_hand(tiny_models, tmp_path):
    from pickalign.reward.pickscore import PickScore
    from pickalign.reward.registry import load_reward

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy", "white")]
    prompts = ["a red square", "a blue square", "a white square"]
    clip = PickScore.from_pretrained(tiny_models["clip"], device="cpu")
    text = clip._text_per_image(prompts)
    embedded = clip.embed_images(images)
    cosine = (text * embedded).sum(-1)
    scored = load_reward(f"clip:{tiny_models['clip']}", "cpu").score(prompts, images)
    assert scored.tolist() == pytest.approx((100 * cosine).clamp(min=0).tolist(), abs=1e-4)

    dim = clip.model.config.projection_dim
    torch.manual_seed(0)
    state = {
        "layers.0.weight": torch.randn(16, dim),
        "layers.0.bias": torch.randn(16),
        "layers.2.weight": torch.randn(4, 16),
        "layers.2.bias": torch.randn(4),
        "layers.3.weight": torch.randn(1, 4),
        "layers.3.bias": torch.randn(1),
    }
    torch.save(state, tmp_path / "head.pth")
    scorer = load_reward(f"aesthetic:{tmp_path / 'head.pth'}:{tiny_models['clip']}", "cpu")
    hidden = embedded @ state["layers.0.weight"].T + state["layers.0.bias"]
    hidden = hidden @ state["layers.2.weight"].T + state["layers.2.bias"]  # dropout is off
    expected = hidden @ state["layers.3.weight"].T + state["layers.3.bias"]
    assert scorer.score(prompts, images).tolist() == pytest.approx(
        expected.flatten().tolist(), abs=1e-4
    )
    torch.save({"weight": torch.randn(1, dim + 1), "bias": torch.zeros(1)}, tmp_path / "v1.pth")
    with pytest.raises(ValueError, match="made for another CLIP"):
        load_reward(f"aesthetic:{tmp_path / 'v1.pth'}:{tiny_models['clip']}", "cpu")


def lookup(results: dict, key: str):
    value = results
    for part in json.loads(key):  # the path as a JSON list
        value = value[part]
    return value


@pytest.mark.integration
def test_the_report_in_a_browser_shows_every_image_and_the_figures_of_results_json(
    evaluated, tmp_path
):
    results = json.loads((evaluated / "results.json").read_text())
    browser = chrome(tmp_path)
    try:
        browser.get((evaluated / "report.html").as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
            "i.naturalWidth]);"
        )
        figures = browser.execute_script(
            "return Array.from(document.querySelectorAll('.fig')).map(e => [e.dataset.key, "
            "e.textContent]);"
        )
        title = browser.title
    finally:
        browser.quit()
    assert title == results["title"]
    # the grid: 4 items x 3 models, each loaded (a broken link has naturalWidth 0)
    assert len(images) == 12
    assert all(complete and width == 64 for _, complete, width in images), images
    assert {src for src, _, _ in images} == {r["path"] for r in results["images"] if r["index"] < 4}
    keys = [key for key, _ in figures]
    assert '["win_rates", "bright.v2", "hotter", "base", "estimate"]' in keys
    assert '["means", "base", "oracle", "high"]' in keys
    assert len(figures) > 100
    for key, text in figures:
        value = lookup(results, key)
        digits = len(text.split(".")[1]) if "." in text else 0
        assert float(text) == pytest.approx(value, abs=0.51 * 10**-digits), key


def test_the_shipped_eval_configs_parse_and_say_how_to_launch():

    for path in sorted((REPO / "recipes/configs/eval").glob("*.yaml")):
        config = eval_config(path)
        header = path.read_text().split("\ntitle:")[0]
        assert "Launch" in header and str(path.relative_to(REPO)) in header.replace("\\\n", "")
        assert len(config.models) >= 3 and config.scorers


def test_eval_command_line_reports_a_bad_field_in_one_line(tmp_path, tiny_models, capsys):
    from pickalign.cli import main

    config = write_config(tmp_path, tiny_models)
    with pytest.raises(SystemExit) as stop:  # a prefix of seeds_per_prompt is no field either
        main(["eval", "--config", str(config), "--seeds", "2"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err
    assert err.startswith("pickalign eval: error:") and "--seeds" in err
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--fields"])
    assert stop.value.code == 0 and "rank_by" in capsys.readouterr().out


def test_a_lora_model_samples_what_stock_diffusers_samples_at_its_scale(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    from pickalign.align.lora import add_lora, save_lora
    from pickalign.align.sampler import generate
    from pickalign.eval.generate import ModelSpec, load_pipeline

    unet = DiffusionPipeline.from_pretrained(tiny_models["sd"]).unet
    add_lora(unet, rank=4)
    torch.manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    save_lora(unet, tmp_path / "lora")
    prompts, seeds = ["a red circle on a blue background"] * 2, [0, 1]
    images = {}
    for scale in (1.0, 0.3):
        stock = DiffusionPipeline.from_pretrained(tiny_models["sd"])
        stock.load_lora_weights(tmp_path / "lora", weight_name=WEIGHT_NAME, adapter_name="x")
        stock.set_adapters(["x"], adapter_weights=[scale])
        spec = ModelSpec("m", str(tiny_models["sd"]), lora=str(tmp_path / "lora"), lora_scale=scale)
        ours = load_pipeline(spec, "cpu")
        expected, got = generate(stock, prompts, seeds, 3), generate(ours, prompts, seeds, 3)
        for a, b in zip(expected, got):
            assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 2
        images[scale] = np.asarray(got[0], int)
    base = np.asarray(
        generate(DiffusionPipeline.from_pretrained(tiny_models["sd"]), prompts, seeds, 3)[0], int
    )
    assert np.abs(images[1.0] - images[0.3]).max() > 10 and np.abs(images[1.0] - base).max() > 10
