import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pickalign.cli import main as cli
from pickalign.reward.pickscore import PickScore


@pytest.fixture(scope="module")
def scorer(tiny_models):
    return PickScore.from_pretrained(tiny_models["clip"], device="cpu")


def images(n=3, size=(48, 40)):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)
    ]


def test_scores_match_the_model_card_computation(scorer, tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = (
        CLIPModel.from_pretrained(tiny_models["clip"]),
        CLIPProcessor.from_pretrained(tiny_models["clip"]),
    )
    pics, prompt = images(), "a red circle on a blue background"
    with torch.no_grad():
        image_inputs = processor(images=pics, return_tensors="pt")
        text_inputs = processor(
            text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        # The model card's code; transformers 5 returns an output object, 4 the tensor.
        image_embs = model.get_image_features(**image_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
    assert torch.allclose(scorer.score(prompt, pics), expected, atol=1e-4)
    probs = scorer.probs(prompt, pics)
    assert torch.allclose(
        probs, expected.softmax(0), atol=1e-5
    ) and probs.sum().item() == pytest.approx(1)


def test_each_prompt_is_encoded_once(scorer, monkeypatch):
    encoded = []
    original = scorer.model.get_text_features

    def counting(input_ids, attention_mask=None):
        encoded.append(len(input_ids))
        return original(input_ids=input_ids, attention_mask=attention_mask)

    monkeypatch.setattr(scorer.model, "get_text_features", counting)
    scores = scorer.score(["a dog", "a cat", "a dog", "a dog"], images(4))
    assert encoded == [2] and scores.shape == (4,)
    # a frozen reward keeps prompt embeddings across calls (an online run's next round)
    again = scorer.score(["a dog", "a cat", "a dog", "a dog"], images(4))
    assert encoded == [2]
    torch.testing.assert_close(again, scores)
    scorer.score(["a cat", "a bird"], images(2))
    assert encoded == [2, 1]
    # the kept embeddings are not inference tensors: the differentiable path can use them
    pixels = torch.rand(2, 3, 40, 48, requires_grad=True)
    scorer.differentiable(["a cat", "a dog"], pixels, value_range=(0.0, 1.0)).sum().backward()
    assert encoded == [2, 1] and pixels.grad.abs().sum() > 0
    monkeypatch.setattr("pickalign.reward.pickscore.TEXT_CACHE_SIZE", 2)  # one call of more prompts
    assert scorer.score(["p1", "p2", "p3"], images(3)).shape == (3,)


def test_pil_numpy_and_tensor_inputs_agree_and_modes_are_converted(scorer):
    pil = images(1)[0]
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    as_read = torch.from_numpy(array).permute(2, 0, 1)  # uint8 in [0, 255], as read from a file
    scores = scorer.score("x", [pil, array, tensor, as_read])
    assert torch.allclose(scores, scores[0].expand(4), atol=1e-4)
    with pytest.raises(ValueError, match="give uint8 in"):
        scorer.score("x", [as_read.long()])
    odd = [pil.convert("RGBA"), pil.convert("L"), pil.convert("P"), pil.convert("CMYK")]
    assert torch.isfinite(scorer.score("x", odd)).all()


def test_empty_prompt_is_scored_and_long_prompts_warn_once(scorer):
    assert torch.isfinite(scorer.score("", images(1))).all()
    fresh = PickScore(scorer.model, scorer.processor, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.score("cat " * 100, images(1))
        fresh.score("dog " * 100, images(1))
    assert sum("truncated" in str(w.message) for w in caught) == 1


def test_differentiable_reward_agrees_with_the_processor_and_has_gradients(scorer):
    from pickalign.reward.toyworld import all_attributes, render

    rng = np.random.default_rng(0)  # natural images: smooth regions and antialiased edges
    pics = [render(a, rng, size=64).crop((0, 8, 64, 56)) for a in all_attributes()[:: 450 // 4][:4]]
    reference = scorer.score("a green square", pics)
    pixels = torch.stack([torch.from_numpy(np.asarray(p)).permute(2, 0, 1) for p in pics]).float()
    pixels = (pixels / 127.5 - 1).requires_grad_(True)  # [-1, 1], as a VAE decodes
    scores = scorer.differentiable("a green square", pixels)
    # the processor resizes in PIL and rounds to uint8; ours stays in float: 2% tolerance
    assert torch.allclose(scores.detach(), reference, rtol=0.02, atol=0.02)
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    in_unit_range = scorer.differentiable(
        "a green square", (pixels.detach() + 1) / 2, value_range=(0, 1)
    )
    assert torch.allclose(in_unit_range, scores.detach(), atol=1e-4)


def test_device_preprocessing_agrees_with_the_processor_and_keeps_order(scorer, monkeypatch):
    from pickalign.reward.toyworld import all_attributes, render

    rng = np.random.default_rng(1)
    combos = all_attributes()[::97][:5]
    sizes = [64, 80, 64, 96, 80]  # three sizes, interleaved: grouped for upload, then reordered
    pics = [render(a, rng, size=s) for a, s in zip(combos, sizes)]
    prompts = [a.prompt for a in combos]
    on_device = PickScore(scorer.model, scorer.processor, device="cpu", preprocess="device")
    assert on_device.preprocess == "device" and scorer.preprocess == "processor"
    reference = scorer.score(prompts, pics)
    scores = on_device.score(prompts, pics)
    # float resampling vs the processor's uint8 rounding, as for the differentiable reward
    assert torch.allclose(scores, reference, rtol=0.02, atol=0.02)
    assert torch.equal(scores.argsort(), reference.argsort())
    # batches of 2: each batch staged on a thread while the previous one is embedded
    assert torch.allclose(on_device.score(prompts, pics, batch_size=2), scores, atol=1e-5)
    # float tensors in [0, 1] (a pipeline's output) go straight to preprocess_tensor
    same = pics[:1] * 3
    expected = on_device.score(prompts[:3], same)
    tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1) / 255 for p in same]
    monkeypatch.setattr(on_device, "stage_pixels", lambda images: pytest.fail("host trip"))
    assert torch.allclose(on_device.score(prompts[:3], tensors), expected, atol=1e-4)
    with pytest.raises(ValueError, match="preprocess"):
        PickScore(scorer.model, scorer.processor, device="cpu", preprocess="gpu")


def test_compile_puts_the_vision_tower_under_torch_compile(scorer, monkeypatch):
    compiled = []
    monkeypatch.setattr(
        type(scorer.model.vision_model), "compile", lambda self: compiled.append(self)
    )
    PickScore(scorer.model, scorer.processor, device="cpu", compile=True)
    assert compiled == [scorer.model.vision_model]


def test_score_cli(tiny_models, tmp_path, capsys):
    paths = []
    for i, image in enumerate(images(2)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    assert cli(["score", "--model", str(tiny_models["clip"]), "--prompt", "a dog", *paths]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in paths) and "p(preferred)" in out
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert cli(["score", "--model", str(tiny_models["clip"]), "--prompt", "a", str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
