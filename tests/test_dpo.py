"""Diffusion-DPO: the loss, LoRA handling, SDXL micro-conditioning, the cache and the recipe."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pickalign.align.dpo import DPOConfig, pair_step, train
from pickalign.align.finetune import lora_reference
from pickalign.align.lora import (
    WEIGHT_NAME,
    LoraMismatchError,
    add_lora,
    load_lora,
    lora_parameters,
    save_lora,
    skip_lora_input_casts,
)
from pickalign.align.losses import diffusion_dpo_loss
from pickalign.align.models import load_parts
from pickalign.align.pairs import (
    CachedPairs,
    PairCrop,
    PreferencePairs,
    build_cache,
    collate_pairs,
    prepare_image,
)
from pickalign.eval.toy.judge import ToyJudgeConfig
from pickalign.reward.data import load_pickapic
from tests.conftest import REPO, launch


def small(model, data, out, **overrides) -> DPOConfig:
    fields = dict(
        model=str(model),
        dataset=str(data),
        output_dir=str(out),
        resolution=32,
        batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        warmup_steps=0,
        beta=500.0,
        checkpointing_steps=2,
        report_to="none",
        logging_steps=1,
    )
    return DPOConfig(**{**fields, **overrides})


def log_rows(folder) -> list[dict]:
    """Every row of a run's log.jsonl (a validation row shares its step with a training row)."""
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def log(folder) -> dict[int, dict]:
    return {row["step"]: row for row in log_rows(folder)}


# ----------------------------------------------------------------------------------------------
# The loss


def test_loss_by_hand():
    win, lose = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    rw, rl = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])
    terms = diffusion_dpo_loss(win, lose, rw, rl, beta=10.0)
    inside = -5.0 * torch.tensor([(0.10 - 0.15) - (0.20 - 0.15), (0.30 - 0.20) - (0.10 - 0.20)])
    expected = -torch.nn.functional.logsigmoid(inside).mean()
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.implicit_accuracy.item() == 0.5  # first pair ranked right, second wrong
    tie = diffusion_dpo_loss(win, lose, rw, rl, beta=10.0, labels=torch.tensor([0.5, 0.5]))
    assert tie.loss.item() > math.log(2)  # a tie is best served by moving neither image


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_policy_equal_to_reference_gives_log2_and_half_accuracy(tiny_models, family):
    from accelerate import Accelerator

    parts = load_parts(str(tiny_models[family]))
    add_lora(parts.unet, rank=4)  # lora_B starts at zero: policy == reference
    latents = torch.randn(3, 2, 4, 8, 8)
    cond = parts.encode_prompts(["a red cat", "a blue dog", "a green cube"])
    time_ids = torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(3, 2, 6) if family == "sdxl" else None
    figures = pair_step(
        parts.unet,
        lora_reference(Accelerator(cpu=True), parts.unet),
        parts.noise_scheduler,
        latents,
        cond,
        time_ids,
        beta=5000.0,
    )
    assert figures["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert figures["implicit_accuracy"].item() == 0.5
    figures["loss"].backward()
    with_grad = {n for n, p in parts.unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(p.grad.abs().sum() > 0 for p in lora_parameters(parts.unet))


# ----------------------------------------------------------------------------------------------
# LoRA round trip


TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _perturbed_lora(unet, rank: int, alpha: float) -> None:
    add_lora(unet, rank=rank, alpha=alpha, targets=TARGETS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def _sample(pipe):
    out = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=3.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images[0]


def test_skipping_lora_input_casts_under_autocast_changes_no_output_or_gradient(tiny_models):
    parts = load_parts(str(tiny_models["sd"]), unet_dtype=torch.bfloat16)
    unet = parts.unet
    _perturbed_lora(unet, rank=4, alpha=4)  # fp32 LoRA on a bf16 UNet, as bf16 training holds it
    noisy = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)

    def run():
        unet.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(noisy, torch.tensor([10, 700]), encoder_hidden_states=context).sample
        out.float().square().mean().backward()
        return out.detach(), [p.grad.clone() for p in lora_parameters(unet)]

    cast_out, cast_grads = run()
    skip_lora_input_casts(unet)
    skip_out, skip_grads = run()
    assert cast_out.abs().sum() > 0 and any(g.abs().sum() > 0 for g in cast_grads)
    assert torch.equal(skip_out, cast_out)
    assert all(torch.equal(a, b) for a, b in zip(skip_grads, cast_grads, strict=True))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_round_trips_through_fresh_pipelines_with_alpha_not_rank(
    tiny_models, family, tmp_path
):
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(tiny_models[family])
    plain = _sample(base)
    _perturbed_lora(base.unet, rank=4, alpha=16.0)  # scale 4: a wrong alpha would show
    trained = _sample(base)
    assert np.abs(trained - plain).max() > 1e-3  # the LoRA changes the output
    save_lora(base.unet, tmp_path)
    meta = json.loads((tmp_path / "pickalign_lora.json").read_text())
    assert meta["family"] == family

    fresh = DiffusionPipeline.from_pretrained(tiny_models[family])
    # Stock diffusers; the file named since diffusers 0.35 won't guess it with the Hub offline.
    fresh.load_lora_weights(str(tmp_path), weight_name=WEIGHT_NAME)
    np.testing.assert_allclose(_sample(fresh), trained, atol=1e-5)
    checked = load_lora(DiffusionPipeline.from_pretrained(tiny_models[family]), tmp_path)
    np.testing.assert_allclose(_sample(checked), trained, atol=1e-5)


def test_lora_for_another_architecture_fails_naming_it(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    sd = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    _perturbed_lora(sd.unet, rank=4, alpha=4.0)
    save_lora(sd.unet, tmp_path)
    sdxl = DiffusionPipeline.from_pretrained(tiny_models["sdxl"])
    with pytest.raises(LoraMismatchError, match="made for an SD UNet.*SDXL UNet"):
        load_lora(sdxl, tmp_path)
    (tmp_path / "pickalign_lora.json").unlink()  # a LoRA from elsewhere: checked by shapes
    with pytest.raises(LoraMismatchError, match="was not made for this UNet"):
        load_lora(sdxl, tmp_path)


# ----------------------------------------------------------------------------------------------
# SDXL micro-conditioning


def test_time_ids_of_a_non_square_flipped_cropped_pair():
    rng = np.random.default_rng(0)
    winner = Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8))  # h 60, w 100
    loser = Image.fromarray(rng.integers(0, 255, (90, 150, 3), dtype=np.uint8))  # h 90, w 150
    crop = PairCrop(flip=True, top_fraction=0.0, left_fraction=0.25)
    (pw, tw), (pl, tl) = (prepare_image(im, 30, crop) for im in (winner, loser))
    # Short side 60 -> 30: 50 x 30 after resizing; free width 20, crop left = 0.25 * 20 = 5.
    assert tw.tolist() == [60, 100, 0, 5, 30, 30]
    assert tl.tolist() == [90, 150, 0, 5, 30, 30]
    by_hand = winner.resize((50, 30), Image.BICUBIC).transpose(Image.FLIP_LEFT_RIGHT)
    by_hand = np.asarray(by_hand.crop((5, 0, 35, 30)), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(pw.permute(1, 2, 0).numpy(), by_hand, atol=1e-6)
    unflipped, _ = prepare_image(winner, 30, PairCrop(False, 0.0, 0.25))
    assert not torch.allclose(unflipped, pw)


def test_dataset_gives_both_images_the_same_augmentation(toy_pairs):
    rows = load_pickapic(toy_pairs, "train", streaming=False)
    pairs = PreferencePairs(rows, 24, random_crop=True, random_flip=True, seed=3)
    items = [pairs[i] for i in range(len(pairs))]
    assert all(torch.equal(it["time_ids"][0, 2:4], it["time_ids"][1, 2:4]) for it in items)
    assert all(it["label"].item() == 1.0 for it in items)  # ties dropped by default
    tie_rows = sum(v == 0.5 for v in rows["label_0"])
    assert len(pairs) == len(rows) - tie_rows
    again = PreferencePairs(rows, 24, random_crop=True, random_flip=True, seed=3)
    assert torch.equal(again[0]["pixels"], items[0]["pixels"])  # same row, same crop


# ----------------------------------------------------------------------------------------------
# The precompute cache


def test_cache_matches_direct_encoding_and_resumes(tiny_models, toy_pairs, tmp_path):
    parts = load_parts(str(tiny_models["sdxl"]))
    rows = load_pickapic(toy_pairs, "train", streaming=False)
    pairs = PreferencePairs(rows, 64)
    build_cache(parts, pairs, tmp_path, shard_size=5, dtype=torch.float32, progress=False)
    cached = CachedPairs(tmp_path)
    assert len(cached) == len(pairs)
    item, raw = cached[7], pairs[7]
    expected = parts.encode_images(raw["pixels"])
    torch.testing.assert_close(item["latents"], expected, rtol=1e-5, atol=1e-5)
    cond = parts.encode_prompts([raw["prompt"]])
    torch.testing.assert_close(item["context"], cond.context[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item["pooled"], cond.pooled[0], rtol=1e-5, atol=1e-5)
    # A build stopped after some shards resumes and ends with identical files.
    before = (tmp_path / "pairs-00001.safetensors").read_bytes()
    (tmp_path / "pairs-00001.safetensors").unlink()
    (tmp_path / "cache.json").unlink()
    build_cache(parts, pairs, tmp_path, shard_size=5, dtype=torch.float32, progress=False)
    assert (tmp_path / "pairs-00001.safetensors").read_bytes() == before
    torch.testing.assert_close(CachedPairs(tmp_path)[7]["latents"], item["latents"])
    with pytest.raises(ValueError, match="was started with"):
        build_cache(parts, pairs, tmp_path, shard_size=4, progress=False)


# ----------------------------------------------------------------------------------------------
# The recipe


def test_training_moves_only_the_lora_and_writes_a_loadable_adapter(
    tiny_models, toy_pairs, tmp_path
):
    from diffusers import DiffusionPipeline

    final = train(
        small(tiny_models["sd"], toy_pairs, tmp_path, cache_dir=str(tmp_path / "c")), "sd"
    )
    assert (final / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors").exists()
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 1
    assert "load_lora_weights" in (final / "README.md").read_text()
    steps = log(tmp_path)
    assert steps[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    plain = _sample(pipe)
    pipe.load_lora_weights(str(final), weight_name=WEIGHT_NAME)
    assert np.abs(_sample(pipe) - plain).max() > 0  # trained: differs from the base


def test_bf16_run_holds_the_frozen_unet_in_bf16_and_trains_an_fp32_lora(
    tiny_models, toy_pairs, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from pickalign.align import finetune

    seen = {}
    load, add = finetune.load_parts, finetune.add_lora

    def recording_load_parts(*args, **kwargs):  # loaded in bf16: no transient fp32 copy
        parts = load(*args, **kwargs)
        seen["loaded"] = {p.dtype for p in parts.unet.parameters()}
        return parts

    def recording_add_lora(unet, *args, **kwargs):
        add(unet, *args, **kwargs)
        seen["lora"] = {p.dtype for p in lora_parameters(unet)}

    monkeypatch.setattr(finetune, "load_parts", recording_load_parts)
    monkeypatch.setattr(finetune, "add_lora", recording_add_lora)
    skip = finetune.skip_lora_input_casts
    monkeypatch.setattr(
        finetune, "skip_lora_input_casts", lambda unet: seen.setdefault("skipped", skip(unet))
    )
    config = small(
        tiny_models["sd"],
        toy_pairs,
        tmp_path,
        mixed_precision="bf16",
        max_steps=2,
        validation_split="validation",
        validation_steps=2,
    )
    final = train(config, "sd")
    # and peft's input casts are skipped: every forward (policy, reference, validation) runs
    # under autocast, so the run does not fail on a bf16 input meeting an fp32 LoRA weight
    assert seen == {"loaded": {torch.bfloat16}, "lora": {torch.float32}, "skipped": None}
    rows = log_rows(tmp_path)
    losses = [row[key] for row in rows for key in ("train/loss", "val/loss") if key in row]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # 2 steps, 1 validation
    adapter = load_file(final / "pytorch_lora_weights.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}


def test_resume_repeats_the_later_losses(tiny_models, toy_pairs, tmp_path):
    train(small(tiny_models["sdxl"], toy_pairs, tmp_path / "full", caption_dropout=0.3), "sdxl")
    full = log(tmp_path / "full")
    middle = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(middle / "model.safetensors")  # the adapter only, not the frozen UNet
    assert saved and all("lora_" in key for key in saved)
    train(
        small(
            tiny_models["sdxl"],
            toy_pairs,
            tmp_path / "resumed",
            caption_dropout=0.3,
            resume_from_checkpoint=str(middle),
        ),
        "sdxl",
    )
    resumed = log(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], rel=1e-5)


def test_ema_is_what_gets_released_and_a_resumed_run_continues_it(tiny_models, toy_pairs, tmp_path):
    from safetensors.torch import load_file

    def run(name, **overrides):
        config = small(tiny_models["sd"], toy_pairs, tmp_path / name, **overrides)
        return load_file(train(config, "sd") / "pytorch_lora_weights.safetensors")

    last = run("plain")
    averaged = run("ema", ema_decay=0.5)
    # The average does not steer training (same losses) but is what the run releases.
    for step in (1, 2, 3, 4):
        assert log(tmp_path / "ema")[step]["train/loss"] == pytest.approx(
            log(tmp_path / "plain")[step]["train/loss"], rel=1e-6
        )
    assert last.keys() == averaged.keys()
    assert max((last[k] - averaged[k]).abs().max().item() for k in last) > 1e-6
    # Resumed from step 2, the average carries on from its saved state (restarting it would
    # give different weights).
    middle = tmp_path / "ema" / "checkpoints" / "checkpoint-2"
    resumed = run("resumed", ema_decay=0.5, resume_from_checkpoint=str(middle))
    for key in averaged:
        torch.testing.assert_close(resumed[key], averaged[key], rtol=1e-5, atol=1e-7)


def test_full_mode_saves_a_diffusers_unet(tiny_models, toy_pairs, tmp_path):
    from diffusers import UNet2DConditionModel

    final = train(
        small(
            tiny_models["sd"],
            toy_pairs,
            tmp_path,
            mode="full",
            max_steps=2,
            reference_offload=True,
            loss="dpo",
        ),
        "sd",
    )
    trained = UNet2DConditionModel.from_pretrained(final / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet")
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert any(moved)


def test_nan_loss_stops_with_the_step(tiny_models, toy_pairs, tmp_path):
    with pytest.raises(ValueError, match="beta: got nan, expected > 0"):
        small(tiny_models["sd"], toy_pairs, tmp_path, beta=float("nan"))
    config = small(tiny_models["sd"], toy_pairs, tmp_path)
    config.beta = float("nan")  # past the config's check: the loop's own guard must stop it
    with pytest.raises(FloatingPointError, match="at step 1"):
        train(config, "sd")


def test_wrong_family_is_named(tiny_models, toy_pairs, tmp_path):
    with pytest.raises(ValueError, match="SDXL UNet but the recipe trains SD"):
        train(small(tiny_models["sdxl"], toy_pairs, tmp_path), "sd")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("config", "recipe"), [("cpu_2proc.yaml", "dpo.py"), ("cpu_zero2_2proc.yaml", "dpo_sd.py")]
)
def test_two_process_runs(tiny_models, toy_pairs, tmp_path, config, recipe):
    """Both launch modes, through recipes/dpo.py and its alias (the family read from the UNet)."""
    launch(
        config,
        str(REPO / "recipes" / recipe),
        "--model",
        str(tiny_models["sd"]),
        "--dataset",
        str(toy_pairs),
        "--resolution",
        "32",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "2",
        "--batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--checkpointing_steps",
        "0",
        "--report_to",
        "none",
    )
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["distributed_type"] == ("DEEPSPEED" if "zero2" in config else "MULTI_CPU")
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "recipes/configs/dpo").glob("*.yaml"))
)
def test_shipped_configs_parse(name):
    from pickalign.config import parse_config

    config, _ = parse_config(
        (DPOConfig, ToyJudgeConfig), ["--config", str(REPO / "recipes/configs/dpo" / name)]
    )
    if "pickapic_v2" in name:  # the paper's batch and learning rate
        assert config.pairs_per_step == 2048 and config.max_steps == 2000
        assert config.learning_rate * config.pairs_per_step == pytest.approx(2.048e-5)
        assert config.scale_lr and config.beta == 5000
        assert config.mode == ("lora" if "lora" in name else "full")


def test_scale_lr_scales_the_optimizer_not_the_config():
    """The saved config.yaml says what was asked, the optimizer and the model card what ran."""
    from accelerate import Accelerator

    from pickalign.align.dpo import card
    from pickalign.align.finetune import make_optimizer_and_schedule

    config = DPOConfig(
        learning_rate=1e-6, scale_lr=True, batch_size=4, gradient_accumulation_steps=2
    )
    weight = torch.nn.Parameter(torch.zeros(2))
    accelerator = Accelerator(cpu=True)
    optimizer, _ = make_optimizer_and_schedule(config, [weight], accelerator, config.batch_size)
    assert config.learning_rate == 1e-6  # as written
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(8e-6)  # 1e-6 x 4 x 2 x 1
    assert "- lr 8e-06, 100 steps" in card(config, "sd", {}, world=1)
    config.scale_lr = False
    assert "- lr 1e-06, 100 steps" in card(config, "sd", {}, world=1)


@pytest.mark.parametrize("off", ["none", "None", ""])
def test_the_command_line_switches_off_a_validation_split_the_config_sets(off):
    from pickalign.config import parse_config

    toy = ["--config", str(REPO / "recipes/configs/dpo/toy_sd.yaml")]
    both = (DPOConfig, ToyJudgeConfig)
    assert parse_config(both, toy)[0].validation_split == "validation"
    assert parse_config(both, [*toy, "--validation_split", off])[0].validation_split is None


def test_a_pair_with_a_missing_image_follows_the_data_policy(toy_pairs, tmp_path):
    from pickalign.reward.data import BadRowError, write_split

    rows = load_pickapic(toy_pairs, "train", streaming=False).to_list()
    first = int(PreferencePairs(load_pickapic(toy_pairs, "train", streaming=False), 32).index[0])
    rows[first]["jpg_1"] = None
    write_split(rows, tmp_path, "train")
    broken = load_pickapic(tmp_path, "train", streaming=False)
    with pytest.raises(BadRowError, match=f"row {first}, column 'jpg_1'"):
        PreferencePairs(broken, 32)[0]
    skipped = PreferencePairs(broken, 32, skip_bad=True)[0]  # counted by the collate
    assert collate_pairs([skipped]) == {"bad_rows": {first: "null value (jpg_1)"}}


def test_anchored_pairs_hold_the_prediction_at_the_reference(tiny_models):
    from accelerate import Accelerator

    parts = load_parts(str(tiny_models["sd"]))
    add_lora(parts.unet, rank=4)
    reference = lora_reference(Accelerator(cpu=True), parts.unet)
    latents, cond = torch.randn(3, 2, 4, 8, 8), parts.encode_prompts(["", "a cat", "a dog"])
    anchor = torch.tensor([True, False, False])

    def step(weight=10.0):
        return pair_step(
            parts.unet,
            reference,
            parts.noise_scheduler,
            latents,
            cond,
            None,
            beta=5000.0,
            anchor=anchor,
            anchor_weight=weight,
            generator=torch.Generator().manual_seed(0),
        )

    at_init = step()
    assert at_init["anchor_mse"].item() == 0
    assert at_init["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        for p in lora_parameters(parts.unet):
            p.add_(torch.randn_like(p) * 0.1)
    moved, heavier = step(10.0), step(20.0)
    assert moved["anchor_mse"].item() > 0
    extra = (heavier["loss"] - moved["loss"]).item()  # the anchored pair adds weight x drift
    assert extra == pytest.approx(10.0 * moved["anchor_mse"].item(), rel=1e-4)


def test_caption_dropout_runs_on_cached_prompts_and_validates(tiny_models, toy_pairs, tmp_path):
    """The cache stores the unconditional embedding (zeros for SDXL) in fp16 and hands it out in
    fp32 like its pairs; training with dropout and the anchor starts at log 2 (policy ==
    reference) and moves the LoRA."""
    final = train(
        small(
            tiny_models["sdxl"],
            toy_pairs,
            tmp_path,
            cache_dir=str(tmp_path / "c"),
            caption_dropout=0.3,
            uncond_anchor=10.0,
            validation_split="validation",
            validation_steps=1,
            max_steps=2,
        ),
        "sdxl",
    )
    rows = log_rows(tmp_path)
    train_loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    val_loss = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert train_loss[1] == pytest.approx(math.log(2), abs=1e-5)
    assert val_loss[1] != pytest.approx(math.log(2), abs=1e-6)  # one step moved the LoRA
    assert math.isfinite(val_loss[2])
    assert (final / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.integration
def test_a_short_run_learns_the_oracle_preference_on_held_out_prompts(tmp_path):
    """Learning, not only running: from the shipped toy-sd base, a short LoRA run on oracle-labelled
    renders makes the policy rank pairs of held-out prompts (never trained on) the oracle's way
    more often than the reference does (0.5 by construction), with a loss under log 2."""
    from pickalign.eval.toy.data import generate_toy_dataset

    generate_toy_dataset(
        tmp_path / "data",
        seed=0,
        prompts=100,
        pairs_per_prompt=4,
        eval_pairs_per_prompt=4,
        base_models={},
    )
    config = small(
        REPO / "eval/toy/assets/sd",
        tmp_path / "data",
        tmp_path / "run",
        batch_size=16,
        max_steps=30,
        beta=2000.0,
        lora_rank=16,
        checkpointing_steps=0,
        cache_dir=str(tmp_path / "cache"),
        validation_split="validation",
        validation_steps=15,
    )
    final = train(config, "sd")
    validation = json.loads((final / "metrics.json").read_text())["validation"]
    assert validation["split"] == "validation" and validation["pairs"] >= 100  # 129 decided
    assert validation["implicit_accuracy"] >= 0.65
    assert validation["loss"] < math.log(2) - 0.02
    validated = {row["step"]: row for row in log_rows(tmp_path / "run") if "val/loss" in row}
    assert sorted(validated) == [15, 30]
    assert validated[30]["val/loss"] == pytest.approx(validation["loss"])


def test_max_pairs_reads_only_the_rows_that_hold_them(tmp_path, monkeypatch):
    from pickalign.align.pairs import make_pair_dataset
    from pickalign.reward import data
    from pickalign.reward.data import write_split
    from tests.test_data import make_row

    rows = [
        make_row(i, f"p{i}", labels=(0.5, 0.5) if i % 3 == 0 else (1.0, 0.0)) for i in range(60)
    ]
    write_split(rows, tmp_path, "train")
    whole = PreferencePairs(load_pickapic(tmp_path, "train", streaming=False), 16)
    pulled, load = [], data.load_pickapic

    def counted(*args, **kwargs):
        return load(*args, **kwargs).map(lambda row: pulled.append(row["caption"]) or row)

    monkeypatch.setattr(data, "load_pickapic", counted)
    config = DPOConfig(model="unused", dataset=str(tmp_path), max_pairs=10, resolution=16)
    pairs = make_pair_dataset(config, None, None)
    assert [pairs[i]["prompt"] for i in range(len(pairs))] == [
        whole[i]["prompt"] for i in range(10)
    ]  # the same first ten usable pairs (ties skipped) as from the whole split
    assert 10 < len(set(pulled)) < 60  # read by streaming, not the whole split


def test_full_mode_reference_equals_the_policy_at_step_zero_in_bf16(tiny_models, tmp_path):
    import shutil

    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from pickalign.align.finetune import make_reference, setup_unet
    from pickalign.align.models import Conditioning

    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_models["sdxl"], folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    torch.manual_seed(3)
    for module in unet.modules():  # norms like a trained model's, not the fresh 1 and 0
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            module.weight.data = 1 + 0.1 * torch.randn_like(module.weight)
            module.bias.data = 0.1 * torch.randn_like(module.bias)
    unet.save_pretrained(folder / "unet")
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    config = DPOConfig(model=str(folder), mode="full", output_dir=str(tmp_path / "out"))
    assert setup_unet(config, "sdxl", accelerator)[3] is None  # no reference unless asked
    parts, unet, trainable, reference_unet, _ = setup_unet(
        config, "sdxl", accelerator, reference=True
    )
    unet = accelerator.prepare(unet)
    reference = make_reference(accelerator, unet, reference_unet)
    latents = torch.randn(4, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(torch.randn(4, 77, 64), torch.randn(4, 32))
    time_ids = torch.tensor([32.0, 32, 0, 0, 32, 32]).expand(4, 2, 6)
    figures = pair_step(
        unet,
        reference,
        parts.noise_scheduler,
        latents,
        cond,
        time_ids,
        beta=5000.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert figures["winner_drift"] == 0
    torch.testing.assert_close(figures["loss"].detach(), torch.tensor(math.log(2)))


def test_the_moving_average_of_half_precision_weights_is_kept_in_fp32():
    from accelerate import Accelerator

    from pickalign.align.release import make_ema

    # DeepSpeed's bf16 holds the module's weights in bf16: an average kept in bf16 stalls
    weights = [torch.nn.Parameter(torch.full((4,), 0.1, dtype=torch.bfloat16))]
    ema = make_ema(Accelerator(cpu=True), 0.999, weights)
    ema.optimization_step = 10**6  # past the decay's warmup
    with torch.no_grad():
        weights[0].fill_(0.2)
    for _ in range(1000):
        ema.step(weights)
    expected = 0.2001953125 - (0.2001953125 - 0.1) * 0.999**1000  # 0.2 and 0.1 in bf16
    assert ema.shadow_params[0][0].item() == pytest.approx(expected, abs=1e-3)
