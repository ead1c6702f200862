import pytest

from pickalign.eval.toy.data import generate_toy_dataset, shipped_toy_models, with_wrong_attributes
from pickalign.reward.data import PICKAPIC_COLUMNS, SPLITS, DataReport, iter_pairs, load_pickapic
from pickalign.reward.toyworld import Attributes, prefer


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    sizes = generate_toy_dataset(out, seed=3, prompts=6, pairs_per_prompt=3, base_models={})
    return out, sizes


def test_all_five_splits_with_the_19_columns(toy_data):
    import datasets

    out, sizes = toy_data
    assert sizes == {
        "train": 18,
        "validation": 100,
        "test": 400,
        "validation_unique": 50,
        "test_unique": 200,
    }
    for split in SPLITS:
        files = str(out / "data" / f"{split}-*.parquet")
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        assert tuple(ds.column_names) == PICKAPIC_COLUMNS
        assert len(ds) == sizes[split]


def test_prompts_of_train_never_appear_in_evaluation_splits(toy_data):
    out, _ = toy_data
    captions = {s: set(load_pickapic(out, s)["caption"]) for s in SPLITS}
    for held_out in ("validation", "test", "validation_unique", "test_unique"):
        assert not captions["train"] & captions[held_out], held_out
    assert not captions["validation"] & captions["test"]
    unique = load_pickapic(out, "test_unique")
    assert len(set(unique["caption"])) == len(unique) and set(unique["num_example_per_prompt"]) == {
        1
    }


def test_rows_read_back_as_pairs_labelled_by_the_oracle(toy_data):
    out, _ = toy_data
    report = DataReport()
    pairs = list(iter_pairs(load_pickapic(out, "test"), report=report))
    assert report.pairs == 400 and not report.bad
    assert 0 < report.ties < 400  # ties exist, but are not everything
    for pair in pairs[:50]:
        assert (pair.label_0, pair.label_1) == prefer(pair.prompt, pair.image_0, pair.image_1)
    train = load_pickapic(out, "train")
    assert set(train["num_example_per_prompt"]) == {3}
    assert set(train["model_0"]) | set(train["model_1"]) <= {
        "render",
        "render-wrong-1",
        "render-wrong-2",
    }


def test_same_seed_same_bytes_other_seed_other_bytes(toy_data, tmp_path):
    out, _ = toy_data
    generate_toy_dataset(tmp_path / "again", seed=3, prompts=6, pairs_per_prompt=3, base_models={})
    generate_toy_dataset(tmp_path / "other", seed=4, prompts=6, pairs_per_prompt=3, base_models={})
    for split in SPLITS:
        name = f"data/{split}-00000-of-00001.parquet"
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), split
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), split


def test_wrong_attributes_change_exactly_that_many():
    import numpy as np

    rng = np.random.default_rng(0)
    base = Attributes("red", "circle", "blue")
    for count in (1, 2, 3):
        for _ in range(20):
            wrong = with_wrong_attributes(base, count, rng)
            assert sum(a != b for a, b in zip(base.as_tuple(), wrong.as_tuple())) == count
            assert wrong.colour != wrong.background


@pytest.mark.integration
def test_base_model_samples_join_the_mix(tmp_path):
    models = shipped_toy_models()
    assert set(models) == {"toy-sd", "toy-sdxl"}, "the toy base models must ship with pickalign"
    generate_toy_dataset(
        tmp_path,
        seed=0,
        prompts=4,
        pairs_per_prompt=4,
        eval_pairs_per_prompt=1,
        base_models={"toy-sd": models["toy-sd"]},
        sample_steps=4,
    )
    train = load_pickapic(tmp_path, "train")
    sources = set(train["model_0"]) | set(train["model_1"])
    assert "toy-sd" in sources and "render" in sources


def test_a_source_mix_uses_only_its_sources(tmp_path):
    mix = {"render": 1.0, "render-wrong-2": 1.0}
    generate_toy_dataset(tmp_path, prompts=5, pairs_per_prompt=4, base_models={}, mix=mix)
    rows = load_pickapic(tmp_path, "train", streaming=False)
    used = set(rows["model_0"]) | set(rows["model_1"])
    assert used == set(mix)
    with pytest.raises(ValueError, match="unknown: \\['toy-sd'\\]"):
        generate_toy_dataset(tmp_path / "x", prompts=1, base_models={}, mix={"toy-sd": 1.0})


def test_base_models_can_be_swapped_for_a_retrained_one(tmp_path):
    from pickalign.cli import main as cli
    from pickalign.eval.toy.data import with_base_models
    from tests.conftest import REPO

    retrained = REPO / "eval" / "toy" / "assets" / "sdxl"  # any pipeline folder will do
    models = with_base_models({"toy-sd": retrained})
    assert models["toy-sd"] == retrained and models["toy-sdxl"] == shipped_toy_models()["toy-sdxl"]
    with pytest.raises(ValueError, match="no model_index.json"):
        with_base_models({"toy-sd": tmp_path})
    with pytest.raises(ValueError, match="taken by a render source"):
        with_base_models({"render": retrained})
    with pytest.raises(SystemExit, match=f"--base-model: base model 'toy-sd': {tmp_path}"):
        cli(["toy", "data", "--out", str(tmp_path / "out"), "--base-model", f"toy-sd={tmp_path}"])
    with pytest.raises(SystemExit, match="expected name=value"):
        cli(["toy", "data", "--out", str(tmp_path / "out"), "--base-model", "toy-sd"])
    assert not (tmp_path / "out").exists()  # refused before writing anything
