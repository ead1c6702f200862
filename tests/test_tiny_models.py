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
