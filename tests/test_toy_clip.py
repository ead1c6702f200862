"""The toy CLIP: its web, its pretraining (learning, resuming) and the shipped one read through
what a user calls (``CLIPModel`` + ``CLIPProcessor``, ``clip:<folder>``)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pickalign.eval.toy.clip import ToyClipConfig, build_web, train
from pickalign.reward.toyworld import (
    COLOURS,
    SHAPES,
    all_attributes,
    prompt_splits,
    read_image,
    render,
)

ASSETS = Path(__file__).parents[1] / "eval" / "toy" / "assets"
SMALL = dict(
    renders_per_caption=2,
    morphs_per_caption=1,
    vision_width=32,
    text_width=32,
    layers=1,
    learning_rate=3e-3,
    warmup_steps=5,
    eval_prompts=50,
    bases=[],
    logging_steps=5,
    report_to="none",
)


def test_the_web_covers_every_caption_and_morphs_are_captioned_by_the_oracle():
    images, captions = build_web(ToyClipConfig(renders_per_caption=1, morphs_per_caption=1))
    combos = all_attributes()
    n = len(combos)
    renders, morphs = images[:n], images[2 * n :]
    assert list(captions[:n]) == list(range(n)) == list(captions[n : 2 * n])
    assert [read_image(Image.fromarray(r)) for r in renders] == combos
    assert len(morphs) > 0.9 * n  # most morphs stay readable
    seen = [read_image(Image.fromarray(m)) for m in morphs]
    assert [combos[c] for c in captions[2 * n :]] == seen
    assert {a.shape for a in seen} == set(SHAPES) and {a.colour for a in seen} == set(COLOURS)


def test_pretraining_learns_to_name_held_out_renders_and_resumes_where_it_stopped(tmp_path):
    """A short run names renders of the test prompts far above chance (1 in 450); a run resumed
    from its last-but-one checkpoint ends with the weights of the run that went through."""
    from safetensors.torch import load_file

    learned = train(ToyClipConfig(output_dir=str(tmp_path / "learn"), max_steps=60, **SMALL))
    assert json.loads((learned / "metrics.json").read_text())["test_render_retrieval"] >= 0.1

    run = dict(max_steps=6, checkpointing_steps=2, **SMALL)
    through = train(ToyClipConfig(output_dir=str(tmp_path / "a"), **run))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-6")
    resumed = train(
        ToyClipConfig(output_dir=str(tmp_path / "b"), resume_from_checkpoint="latest", **run)
    )
    a, b = load_file(through / "model.safetensors"), load_file(resumed / "model.safetensors")
    start = load_file(tmp_path / "a" / "init" / "model.safetensors")
    assert not torch.equal(a["visual_projection.weight"], start["visual_projection.weight"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _renders(count: int, wrong: int = 0):
    """Renders of the first ``count`` test prompts (with ``wrong`` attributes changed)."""
    from pickalign.eval.toy.data import with_wrong_attributes

    rng = np.random.default_rng(7)
    prompts = prompt_splits()["test"][:count]
    shown = [with_wrong_attributes(a, wrong, rng) if wrong else a for a in prompts]
    return [a.prompt for a in prompts], [render(a, rng) for a in shown]


def test_the_shipped_toy_clip_names_held_out_renders_through_clip_model_and_processor():
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(ASSETS / "clip")
    processor = CLIPProcessor.from_pretrained(ASSETS / "clip")
    captions = [a.prompt for a in all_attributes()]
    prompts, images = _renders(40)
    inputs = processor(text=captions, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        named = model(**inputs).logits_per_image.argmax(dim=1)  # (40,)
    assert np.mean([captions[i] == p for i, p in zip(named.tolist(), prompts)]) >= 0.95


def test_the_shipped_toy_clip_is_a_clip_score_reward():
    from pickalign.reward.registry import load_reward

    reward = load_reward("clip:eval/toy/assets/clip")
    prompts, right = _renders(30)
    _, wrong = _renders(30, wrong=1)
    right_scores, wrong_scores = reward.score(prompts, right), reward.score(prompts, wrong)
    assert ((right_scores >= 0) & (right_scores <= 100)).all()
    assert (right_scores > wrong_scores).float().mean() >= 0.9


def test_the_shipped_toy_pickscore_runs_through_the_model_cards_code():
    """PickScore's usage code, unchanged but for the folder: a right render scores above one with
    an attribute wrong, and one wrong attribute above two."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(ASSETS / "pickscore").eval()
    processor = CLIPProcessor.from_pretrained(ASSETS / "pickscore")

    def calc_probs(prompt, images):
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(
            text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        with torch.no_grad():
            image_embs = model.get_image_features(**image_inputs)
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = getattr(text_embs, "pooler_output", text_embs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]

    prompts, right = _renders(30)
    _, one = _renders(30, wrong=1)
    _, two = _renders(30, wrong=2)
    scores = torch.stack([calc_probs(p, [a, b, c]) for p, a, b, c in zip(prompts, right, one, two)])
    assert (scores[:, 0] > scores[:, 1]).float().mean() >= 0.9
    assert (scores[:, 1] > scores[:, 2]).float().mean() >= 0.8


def test_a_missing_vae_or_base_is_refused_before_any_work(tmp_path):
    from pickalign.reward.sources import ArtefactError

    with pytest.raises(ArtefactError, match="vae: no/vae"):
        train(ToyClipConfig(output_dir=str(tmp_path), vae="no/vae"))
    with pytest.raises(ArtefactError, match="bases: no/base"):
        train(ToyClipConfig(output_dir=str(tmp_path), bases=["no/base"]))
    assert not any(tmp_path.iterdir())
