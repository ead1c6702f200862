import json

import pytest
import torch


def test_tiny_clip_loads_like_a_hub_model(tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(tiny_models["clip"])
    from PIL import Image

    inputs = processor(
        text=["a red circle", "a blue square"],
        images=[Image.new("RGB", (50, 40), "red")],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, 2)
    assert inputs["pixel_values"].shape[-2:] == (32, 32)


def test_tiny_sd_generates_from_a_saved_folder(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd"])
    assert pipe.vae_scale_factor == 8
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    again = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert (image == again).all()  # seeded generation is reproducible


def test_tiny_sdxl_uses_two_encoders_and_time_ids(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"])
    assert pipe.text_encoder_2 is not None
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("family, forces_zeros", [("sd", None), ("sdxl", True), ("sdxl", False)])
def test_training_unconditional_is_what_the_stock_pipeline_samples(
    tiny_models, tmp_path, family, forces_zeros
):
    """Caption dropout trains the branch that classifier-free guidance samples: the negative
    embeddings of the stock pipeline's own ``encode_prompt``."""
    import shutil

    import diffusers

    from pickalign.align.models import load_parts

    folder = tiny_models[family]
    if forces_zeros is not None:  # the same weights with the option written either way
        folder = shutil.copytree(folder, tmp_path / "pipe")
        index = json.loads((folder / "model_index.json").read_text())
        index["force_zeros_for_empty_prompt"] = forces_zeros
        (folder / "model_index.json").write_text(json.dumps(index))
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    encoded = pipe.encode_prompt(
        prompt="a red circle",
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )
    uncond = load_parts(str(folder)).unconditional()
    assert torch.allclose(uncond.context, encoded[1], atol=1e-6)
    if family == "sdxl":
        assert torch.allclose(uncond.pooled, encoded[3], atol=1e-6)
    else:
        assert uncond.pooled is None
    zeros = bool(forces_zeros)
    assert bool((uncond.context == 0).all()) == zeros  # the rule took the branch it should
