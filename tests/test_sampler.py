"""The DDIM sampler with log-probabilities: it samples what the stock diffusers pipelines sample,
and a step's log-probability recomputed from the stored latents is the one recorded."""

import pytest
import torch

from pickalign.align.models import load_parts
from pickalign.align.sampler import sample, step_log_prob
from pickalign.eval.toy.data import shipped_toy_models
from pickalign.reward.toyworld import prompt_splits

MODELS = shipped_toy_models()
PROMPTS = [a.prompt for a in prompt_splits()["test"][:3]]
SEEDS = [0, 7, 11]


@pytest.mark.parametrize("name", ["toy-sd", "toy-sdxl"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_reproduces_the_stock_pipeline(name, eta):
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODELS[name])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(
        PROMPTS,
        num_inference_steps=8,
        guidance_scale=5.0,
        eta=eta,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        output_type="pt",
    ).images
    ours = sample(load_parts(str(MODELS[name])), PROMPTS, SEEDS, 8, 5.0, eta, log_probs=eta > 0)
    assert ours.images.shape == stock.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours.images, stock.float(), atol=2e-4, rtol=0)
    assert ours.latents.shape == (3, 9, 4, 8, 8) and len(ours.timesteps) == 8
    # Without the trajectory (reward-weighted, the monitor): the same x_0 and images, nothing else
    final = sample(
        load_parts(str(MODELS[name])), PROMPTS, SEEDS, 8, 5.0, eta, keep_trajectory=False
    )
    assert final.latents.shape == (3, 1, 4, 8, 8) and final.log_probs is None
    torch.testing.assert_close(final.latents[:, 0], ours.latents[:, -1], atol=0, rtol=0)
    torch.testing.assert_close(final.images, ours.images, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["toy-sd", "toy-sdxl"])
def test_a_recomputed_step_log_prob_is_the_sampled_one_and_carries_gradients(name):
    from pickalign.align.lora import add_lora, lora_parameters

    parts = load_parts(str(MODELS[name]))
    add_lora(parts.unet, rank=4)
    with torch.no_grad():  # a policy that differs from the base
        for p in lora_parameters(parts.unet):
            p.add_(torch.randn_like(p) * 0.05)
    trajectory = sample(parts, PROMPTS, SEEDS, steps=6, guidance_scale=5.0, eta=1.0)
    assert trajectory.log_probs.shape == (3, 6) and torch.isfinite(trajectory.log_probs).all()
    for step in (0, 3, 5):
        again = step_log_prob(parts.unet, parts, trajectory, step, 5.0, 1.0)
        torch.testing.assert_close(again, trajectory.log_probs[:, step], atol=1e-4, rtol=1e-5)
    again.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(parts.unet))
    with torch.no_grad():  # the same latents are less likely under another policy
        for p in lora_parameters(parts.unet):
            p.add_(torch.randn_like(p) * 0.5)
        other = step_log_prob(parts.unet, parts, trajectory, 3, 5.0, 1.0)
    assert (other - trajectory.log_probs[:, 3]).abs().max() > 1e-3


def test_log_probs_are_refused_where_a_step_has_none():
    parts = load_parts(str(MODELS["toy-sd"]))
    with pytest.raises(ValueError, match="eta 0 makes every DDIM step deterministic"):
        sample(parts, PROMPTS[:1], [0], steps=2, eta=0.0)
    parts.noise_scheduler.register_to_config(set_alpha_to_one=True)  # the last step's std is 0
    with pytest.raises(ValueError, match="set_alpha_to_one is true"):
        sample(parts, PROMPTS[:1], [0], steps=2, eta=1.0)
    assert sample(parts, PROMPTS[:1], [0], steps=2, eta=1.0, log_probs=False).log_probs is None
