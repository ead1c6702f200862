"""The shipped toy base models: loadable like Hub models, readable by the oracle, LoRA-ready."""

import json

import numpy as np
import pytest
import torch

from pickalign.eval.toy.data import shipped_toy_models
from pickalign.eval.toy.judge import oracle_accuracy
from pickalign.eval.toy.pretrain import vae_round_trip
from pickalign.reward.toyworld import prompt_splits, read_image

MODELS = shipped_toy_models()


def generate(pipe, prompts, seeds, steps=20, guidance_scale=5.0):
    """The stock pipeline's own call, as a user samples a shipped model (not our sampler)."""
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators
    ).images


@pytest.mark.parametrize(
    "name, pipeline_class",
    [("toy-sd", "StableDiffusionPipeline"), ("toy-sdxl", "StableDiffusionXLPipeline")],
)
def test_shipped_models_load_and_generate_readable_images(name, pipeline_class):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(MODELS[name])
    prompts = [a.prompt for a in prompt_splits()["test"][:8]]
    images = generate(pipe, prompts, list(range(8)), steps=10)
    assert all(image.size == (32, 32) for image in images)
    assert sum(read_image(image) is not None for image in images) >= 6
    pixels = [np.asarray(image, dtype=int) for image in images]
    repeat = generate(pipe, prompts, list(range(8)), steps=10)
    assert all(np.array_equal(np.asarray(a, dtype=int), b) for a, b in zip(repeat, pixels))
    # A seed gives its image whatever else is in the batch. Not bit for bit: a batch of another
    # size may take other CPU kernels (an Intel Xeon moved one pixel by one level at batch 2),
    # while swapping two seeds moved pixels by up to 22-53 levels, 2.8-6.6 on average.
    again = generate(pipe, prompts[:2], [0, 1], steps=10)
    for alone, batched in zip(again, pixels[:2]):
        diff = np.abs(np.asarray(alone, dtype=int) - batched)
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


# Same weights, prompts and seeds: only the fp16 storage of the shipped UNet and VAE differs from
# what pretraining sampled, so 3 of the 50 prompts may flip. A pipeline whose unconditional
# branch differs from training's lands tens of points away (the first toy SDXL base: 29.5% all
# correct through the stock pipeline against 96.5% sampled as trained, on the test prompts).
AGREEMENT_TOLERANCE = 0.06


@pytest.mark.parametrize("name", ["toy-sd", "toy-sdxl"])
def test_stock_pipeline_samples_a_shipped_base_as_pretraining_measured(name):
    from diffusers import DiffusionPipeline

    from pickalign.eval.toy.pretrain import VALIDATION_FILE
    from pickalign.reward.toyworld import adherence, judge

    measured = json.loads((MODELS[name] / VALIDATION_FILE).read_text())
    pipe = DiffusionPipeline.from_pretrained(MODELS[name])
    prompts = prompt_splits()["validation"]
    images = generate(
        pipe,
        [a.prompt for a in prompts],
        list(range(len(prompts))),
        measured["steps"],
        measured["guidance_scale"],
    )
    stock = adherence([judge(a, image) for a, image in zip(prompts, images)])["all_correct"]
    assert abs(stock - measured["all_correct"]) <= AGREEMENT_TOLERANCE, (stock, measured)


def test_vae_keeps_what_the_oracle_reads():
    result = oracle_accuracy(300, seed=7, transform=vae_round_trip(MODELS["toy-sd"] / "vae"))
    assert result["all_correct"] >= 0.98, result


def test_lora_attaches_to_the_toy_unet_and_starts_at_the_base():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(MODELS["toy-sd"] / "unet")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    before = unet(x, t, encoder_hidden_states=context).sample
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert torch.allclose(unet(x, t, encoder_hidden_states=context).sample, before)


def test_pipelines_are_saved_in_the_layout_transformers_4_reads_too(tiny_models):
    """transformers 4 (in pickalign's supported range) loads the key layout that transformers 5
    writes for a CLIPTextModel built from a config as a randomly initialised text encoder, with
    only a warning, and its slow CLIPTokenizer cannot read a tokenizer.json-only folder. This
    suite runs on transformers 5, so the files themselves are checked: the shipped bases and
    what ``pickalign.align.tiny.save_pipeline`` writes (as the toy pretraining saves a base)."""
    from safetensors import safe_open

    for folder in (MODELS["toy-sd"], MODELS["toy-sdxl"], tiny_models["sd"], tiny_models["sdxl"]):
        index = json.loads((folder / "model_index.json").read_text())
        encoders = [name for name in index if name.startswith("text_encoder")]
        assert encoders, folder
        for name in encoders:
            with safe_open(folder / name / "model.safetensors", "pt") as weights:
                keys = list(weights.keys())
            # The Hub's layout: the transformer under text_model., SDXL's projection beside it.
            layers = [key for key in keys if not key.startswith("text_projection.")]
            assert all(key.startswith("text_model.") for key in layers), (folder, name, keys[:2])
        for name in [name for name in index if name.startswith("tokenizer")]:
            readable = (
                index[name][1] == "CLIPTokenizerFast" or (folder / name / "vocab.json").exists()
            )
            assert readable, (folder, name, index[name])
