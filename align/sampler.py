"""DDIM sampling with per-step log-probabilities, for SD 1.x/2.x and SDXL (the sampler the online
methods train from).

With ``eta > 0`` each DDIM step x_t -> x_{t-1} is a Gaussian around the deterministic DDIM update
with standard deviation ``eta * sigma_t`` (DDIM paper, eq. 16); ``sample`` records every latent of
the trajectory and the log-density of each step's draw, and ``step_log_prob`` recomputes that
log-density from the stored latents under any UNet (with gradients), which is what a policy
gradient needs. Noise is seeded per image exactly as the stock diffusers pipelines draw it from a
list of generators, so a seed gives its image whatever the batch, and ``sample`` reproduces
``pipe(..., generator=[...], eta=eta)`` of ``StableDiffusionPipeline`` and
``StableDiffusionXLPipeline`` with a DDIM scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pickalign.align.models import Conditioning, DiffusionParts, default_time_ids, unet_forward


@dataclass
class Trajectory:
    """What ``sample`` returns: ``latents`` (B, S + 1, C, h, w) from x_T to x_0 (only x_0,
    (B, 1, C, h, w), when the trajectory is not kept), ``log_probs`` (B, S) of each step's draw
    (None when not recorded), ``timesteps`` (S,), ``images``
    (B, 3, H, W) in [0, 1], and what the UNet was conditioned on (prompt and unconditional
    embeddings, SDXL's time ids), so a step can be recomputed without encoding again."""

    latents: torch.Tensor
    log_probs: torch.Tensor | None
    timesteps: torch.Tensor
    images: torch.Tensor
    cond: Conditioning
    uncond: Conditioning
    time_ids: torch.Tensor | None

    def select(self, rows) -> Trajectory:
        """The trajectories of images ``rows`` (indices or a bool mask)."""
        return Trajectory(
            self.latents[rows],
            None if self.log_probs is None else self.log_probs[rows],
            self.timesteps,
            self.images[rows],
            self.cond.index(rows),
            self.uncond.index(rows),
            None if self.time_ids is None else self.time_ids[rows],
        )

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """Trajectories sampled in several batches (same steps) as one batch."""

        def joined(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        cond = [p.cond for p in parts]
        uncond = [p.uncond for p in parts]
        return Trajectory(
            joined("latents"),
            joined("log_probs"),
            parts[0].timesteps,
            joined("images"),
            Conditioning.cat(cond),
            Conditioning.cat(uncond),
            joined("time_ids"),
        )

    def pil(self) -> list:
        """The images as PIL images (rounded to uint8 as the pipelines do)."""
        from PIL import Image

        array = (self.images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round()
        return [Image.fromarray(a.astype("uint8")) for a in array]


def ddim_scheduler(parts: DiffusionParts):
    """A DDIM scheduler with the model's own noise schedule and timestep spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(parts.noise_scheduler.config)


@dataclass
class DDIMStep:
    """One DDIM step x_t -> x_{t-1}: the draw ``prev``, and the Gaussian it was drawn from:
    ``mean`` (B, C, h, w), ``std`` (B,) (0 at eta 0), ``log_prob`` (B,) of ``prev`` averaged over
    the latent's dimensions (None at eta 0)."""

    prev: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def ddim_step(scheduler, model_output, timestep, sample, eta: float, noise=None, prev=None):
    """One DDIM step from ``sample`` (x_t) at ``timestep`` (an int, or (B,) for a batch whose
    images sit at different steps): x_{t-1} is drawn with ``noise`` unless ``prev`` is given.
    ``eta`` must be > 0 for a log-density (an eta-0 step is deterministic)."""
    config = scheduler.config
    t = torch.as_tensor(timestep).reshape(-1).cpu()  # (1,) or (B,)
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    alpha = alphas[t]
    alpha_prev = torch.where(
        prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod
    )
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha, alpha_prev = (
        alpha.view(shape).to(sample.device),
        alpha_prev.view(shape).to(sample.device),
    )
    output = model_output.to(torch.float32)
    x = sample.to(torch.float32)
    if config.prediction_type == "epsilon":
        x0, eps = (x - (1 - alpha).sqrt() * output) / alpha.sqrt(), output
    elif config.prediction_type == "v_prediction":
        x0 = alpha.sqrt() * x - (1 - alpha).sqrt() * output
        eps = alpha.sqrt() * output + (1 - alpha).sqrt() * x
    else:
        raise ValueError(f"prediction_type {config.prediction_type!r}: epsilon or v_prediction")
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    std = eta * variance.sqrt()  # (B or 1, 1, 1, 1)
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    if prev is None:
        # In the latents' dtype before its log-density is taken: a bf16 trajectory stores the
        # rounded value, and a recomputed step must score the same value.
        prev = (mean if noise is None else mean + std * noise.to(mean)).to(sample.dtype)
    log_prob = None
    if eta > 0:
        log_prob = (
            -((prev.detach().float() - mean) ** 2) / (2 * std**2)
            - torch.log(std)
            - 0.5 * math.log(2 * math.pi)
        )
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return DDIMStep(prev.to(sample.dtype), mean, std.flatten().expand(len(mean)), log_prob)


def guided_prediction(unet, x, t, cond: Conditioning, uncond: Conditioning, guidance, time_ids):
    """Classifier-free guidance as the pipelines compute it: one batched UNet call on the
    unconditional and conditional halves, ``u + guidance * (c - u)``."""
    if guidance == 1:
        return unet_forward(unet, x, t, cond, time_ids)
    both = Conditioning(
        torch.cat([uncond.context, cond.context]),
        None if cond.pooled is None else torch.cat([uncond.pooled, cond.pooled]),
    )
    ids = None if time_ids is None else torch.cat([time_ids, time_ids])
    if torch.is_tensor(t) and t.numel() > 1:  # one timestep per image
        t = torch.cat([t, t])
    u, c = unet_forward(unet, torch.cat([x, x]), t, both, ids).chunk(2)
    return u + guidance * (c - u)


def _noise(generators, shape, device, dtype) -> torch.Tensor:
    """One draw per image from its own generator, as the pipelines draw from a generator list."""
    draws = [
        torch.randn((1, *shape), generator=g, device=g.device, dtype=dtype) for g in generators
    ]
    return torch.cat(draws).to(device)


@torch.no_grad()
def sample(
    parts: DiffusionParts,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    size: int | None = None,
    unet=None,
    log_probs: bool = True,
    conditioning: tuple[Conditioning, Conditioning] | None = None,
    keep_trajectory: bool = True,
) -> Trajectory:
    """Sample ``prompts[i]`` from seed ``seeds[i]`` with DDIM, recording the trajectory.

    ``unet`` defaults to ``parts.unet`` (pass a LoRA-wrapped or prepared one to sample the
    policy). The unconditional branch is ``parts.unconditional()``, what the stock pipeline
    uses; ``conditioning`` = (one row per prompt, the unconditional branch as one row) samples
    with given embeddings instead. ``log_probs`` with ``eta`` 0 is refused: an eta-0 step is
    deterministic and has no log-probability. ``keep_trajectory=False`` keeps only x_0 (what
    a method that trains on the final latents needs), and no log-probabilities.
    """
    log_probs = log_probs and keep_trajectory
    if log_probs and eta <= 0:
        raise ValueError(
            "eta 0 makes every DDIM step deterministic, so a step has no log-probability; "
            "use eta > 0 (DDPO uses 1.0), or log_probs=False"
        )
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    unet = unet if unet is not None else parts.unet
    scheduler = ddim_scheduler(parts)
    if log_probs and scheduler.final_alpha_cumprod >= 1:
        raise ValueError(
            "the scheduler's set_alpha_to_one is true, which makes the last DDIM step "
            "deterministic (std 0) with no log-probability; set it to false in the model's "
            "scheduler/scheduler_config.json, as SD and SDXL ship"
        )
    scheduler.set_timesteps(steps)
    scale = parts.vae_scale
    size = size or unet.config.sample_size * scale
    device, dtype = parts.unet.device, next(unet.parameters()).dtype
    cond, uncond = conditioning or (parts.encode_prompts(prompts), parts.unconditional())
    cond, uncond = cond.to(device, dtype), uncond.repeat(len(prompts)).to(device, dtype)
    time_ids = (
        default_time_ids(size, len(prompts)).to(device, dtype) if cond.pooled is not None else None
    )
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (unet.config.in_channels, size // scale, size // scale)
    x = _noise(generators, shape, device, dtype) * scheduler.init_noise_sigma
    latents, logps = [x], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = guided_prediction(unet, model_input, t, cond, uncond, guidance_scale, time_ids)
        noise = _noise(generators, shape, device, dtype) if eta > 0 else None
        step = ddim_step(scheduler, output, int(t), x, eta, noise=noise)
        x = step.prev
        if keep_trajectory:
            latents.append(x)
        if log_probs:
            logps.append(step.log_prob)
    images = decode(parts, x)
    return Trajectory(
        torch.stack(latents if keep_trajectory else [x], dim=1),
        torch.stack(logps, dim=1) if log_probs else None,
        scheduler.timesteps.clone(),
        images,
        cond,
        uncond,
        time_ids,
    )


def recompute_step(
    unet, parts: DiffusionParts, trajectory: Trajectory, step, guidance_scale, eta
) -> DDIMStep:
    """Step ``step`` of ``trajectory`` (x_t -> x_{t-1}, as stored) under ``unet``, with
    gradients: its Gaussian and the stored draw's log-probability, what a policy-gradient update
    differentiates. ``step`` is an int, or (B,) step indices, one per image."""
    scheduler = ddim_scheduler(parts)
    scheduler.set_timesteps(len(trajectory.timesteps))
    index = torch.as_tensor(step).reshape(-1).expand(len(trajectory.latents)).cpu()
    rows = torch.arange(len(index))
    x, prev = trajectory.latents[rows, index], trajectory.latents[rows, index + 1]
    t = trajectory.timesteps[index]  # (B,)
    output = guided_prediction(
        unet,
        x,  # DDIM's scale_model_input is the identity
        t.to(x.device),
        trajectory.cond,
        trajectory.uncond,
        guidance_scale,
        trajectory.time_ids,
    )
    return ddim_step(scheduler, output, t, x, eta, prev=prev)


def step_log_prob(unet, parts: DiffusionParts, trajectory: Trajectory, step, guidance_scale, eta):
    """The log-probability (B,) of step ``step`` of ``trajectory`` under ``unet`` (see
    ``recompute_step``)."""
    return recompute_step(unet, parts, trajectory, step, guidance_scale, eta).log_prob


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    size: int | None = None,
    batch_size: int = 50,
    progress: bool = False,
    conditioning: tuple[Conditioning, Conditioning] | None = None,
) -> list:
    """PIL images of ``prompts[i]`` from seed ``seeds[i]`` with deterministic DDIM (eta 0), in
    batches: what ``pipe(prompts, generator=[...])`` gives with a DDIM scheduler. ``pipe`` is a
    loaded diffusers pipeline (with any LoRA loaded) or ``DiffusionParts``. ``conditioning``:
    embeddings to sample with instead of encoding the prompts (one row per prompt, the
    unconditional branch as one row)."""
    from tqdm.auto import tqdm

    from pickalign.align.models import parts_from_pipeline

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    parts = pipe if isinstance(pipe, DiffusionParts) else parts_from_pipeline(pipe)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="sampling"):
        chunk = slice(start, start + batch_size)
        given = None if conditioning is None else (conditioning[0].index(chunk), conditioning[1])
        trajectory = sample(
            parts,
            prompts[chunk],
            seeds[chunk],
            steps,
            guidance_scale,
            0.0,
            size,
            log_probs=False,
            conditioning=given,
        )
        images += trajectory.pil()
    return images


@torch.no_grad()
def decode(parts: DiffusionParts, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [0, 1]."""
    vae = parts.vae
    shift = vae.config.get("shift_factor") or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
