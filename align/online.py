"""What the online methods (``pickalign.align.ddpo``, ``pickalign.align.reward_weighted``) share: their settings, the
prompts and seeds of a round, sampling and scoring spread over processes with the rewards gathered,
and the end of a run (release, metrics, model card).

A round: every process draws ``samples_per_round`` prompts (``group_size`` samples of each),
samples them with the policy (``pickalign.align.sampler``), scores them with the reward, and the rewards of
all processes are gathered, so per-prompt statistics and weights are global.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pickalign.align.finetune import (
    UNetTuneConfig,
    make_optimizer_and_schedule,
    resume,
    scaled_learning_rate,
    setup_unet,
)
from pickalign.align.models import FAMILIES
from pickalign.align.monitor import Monitor
from pickalign.align.prompts import load_prompts
from pickalign.align.release import model_card, release_writer
from pickalign.align.sampler import Trajectory, sample
from pickalign.config import ConfigError
from pickalign.reward.registry import load_reward
from pickalign.reward.sources import require
from pickalign.runtime import (
    append_log,
    make_accelerator,
    publish,
    save_checkpoint,
    seed_everything,
    write_config,
)


@dataclass
class OnlineConfig(UNetTuneConfig):
    max_steps: int = field(
        default=100,
        metadata={
            "range": "> 0",
            "help": "Rounds to run; a round samples, scores and trains on what it sampled.",
        },
    )
    # Online runs step once or a few times a round: no warmup by default.
    warmup_steps: int = field(
        default=0, metadata={"range": ">= 0", "help": "Learning-rate warmup steps."}
    )
    lr_scheduler: str = field(
        default="constant",
        metadata={
            "choices": ("constant", "constant_with_warmup", "linear", "cosine"),
            "help": "A diffusers scheduler name.",
        },
    )
    reward: str = field(
        default="pickscore",
        metadata={
            "help": "The reward: pickscore[:MODEL] (a Hub id or a folder the reward recipe "
            "wrote; default PickScore_v1), toy-oracle, or module:function taking "
            "(prompts, images) and returning one score per image."
        },
    )
    prompts: str = field(
        default="yuvalkirstain/pickapic_v2:train",
        metadata={
            "help": "Prompts to train on: a Pick-a-Pic dataset (Hub id or folder) with "
            ":SPLIT, a .txt file (one per line), or toy[:SPLIT]."
        },
    )
    max_prompts: int | None = field(
        default=None,
        metadata={"range": "> 0", "help": "Use only the first N distinct prompts."},
    )
    resolution: int | None = field(
        default=None,
        metadata={"range": "> 0", "help": "Image size in pixels (default: the model's)."},
    )
    sample_steps: int = field(
        default=50, metadata={"range": "> 0", "help": "DDIM steps per sample."}
    )
    guidance_scale: float = field(
        default=5.0,
        metadata={"range": ">= 1", "help": "Classifier-free guidance, in sampling and training."},
    )
    eta: float = field(
        default=1.0,
        metadata={"range": "[0, 1]", "help": "DDIM eta of the samples (> 0 for DDPO)."},
    )
    samples_per_round: int = field(
        default=64, metadata={"range": "> 0", "help": "Samples per process per round."}
    )
    group_size: int = field(
        default=1,
        metadata={
            "range": "> 0",
            "help": "A group: the samples of one prompt drawn together in a round (k), side by "
            "side; advantages (DDPO's 'group') and weights (reward-weighted) compare within it. "
            "A prompt drawn twice makes two groups. samples_per_round must be a multiple.",
        },
    )
    sample_batch_size: int = field(
        default=16, metadata={"range": "> 0", "help": "Images per sampling batch."}
    )
    train_batch_size: int = field(
        default=8, metadata={"range": "> 0", "help": "Samples per training micro-batch."}
    )
    inner_epochs: int = field(
        default=1,
        metadata={"range": "> 0", "help": "Passes over each round's samples."},
    )
    monitor_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Held-out prompts sampled with fixed seeds every monitor_every rounds and "
            "scored by the reward and by monitor_rewards, to see reward hacking (e.g. "
            "toy:validation). None: off."
        },
    )
    monitor_count: int = field(default=64, metadata={"range": "> 0", "help": "Monitor prompts."})
    monitor_seeds: int = field(
        default=1,
        metadata={
            "range": "> 0",
            "help": "Seeds per monitor prompt: more images, a steadier figure when the held-out "
            "prompts are few.",
        },
    )
    monitor_every: int = field(
        default=5, metadata={"range": "> 0", "help": "Monitor every N rounds."}
    )
    monitor_guidance: float = field(
        default=5.0,
        metadata={"range": ">= 1", "help": "Guidance of the monitor's samples (as evaluated)."},
    )
    monitor_steps: int | None = field(
        default=None,
        metadata={
            "range": "> 0",
            "help": "Sampling steps of the monitor's samples: as evaluated, when training samples "
            "with fewer (None: sample_steps).",
        },
    )
    monitor_rewards: list[str] = field(
        default_factory=list,
        metadata={"help": "More rewards scored on the monitor samples (e.g. toy-oracle)."},
    )
    reward_running_rounds: int = field(
        default=10,
        metadata={
            "range": "> 0",
            "help": "Rounds in the logged running mean of the training reward "
            "(train/reward_running_mean): one round's mean over a few prompts is mostly which "
            "prompts were drawn.",
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_round % self.group_size:
            raise ConfigError(
                f"samples_per_round {self.samples_per_round} is not a multiple of group_size "
                f"{self.group_size}"
            )
        per_step = self.train_batch_size * self.gradient_accumulation_steps
        if self.trained_per_round() % per_step:
            raise ConfigError(
                f"the {self.trained_per_round()} samples a round trains on (per process) are not "
                f"a multiple of train_batch_size x gradient_accumulation_steps ({per_step})"
            )

    def trained_per_round(self) -> int:
        """Samples a round trains on, per process."""
        return self.samples_per_round

    def steps_per_round(self) -> int:
        """Optimizer steps per round."""
        per_step = self.train_batch_size * self.gradient_accumulation_steps
        return self.inner_epochs * self.trained_per_round() // per_step


def round_prompts(
    prompts: list[str], config: OnlineConfig, round_: int, rank: int
) -> tuple[list[str], list[int]]:
    """This process's prompts and seeds for round ``round_``: ``samples_per_round / group_size``
    prompts drawn at random (a prompt may come twice: two groups), each ``group_size`` times in
    a row, and a distinct seed per image.
    A function of (seed, round, rank) alone, so a resumed run draws the same."""
    rng = random.Random(hash((config.seed, round_, rank)))
    drawn = rng.choices(prompts, k=config.samples_per_round // config.group_size)
    batch = [p for p in drawn for _ in range(config.group_size)]
    first = ((config.seed * 1_000_003 + round_) * 4096 + rank) * config.samples_per_round
    return batch, [(first + i) % 2**63 for i in range(len(batch))]


def rollout(
    parts,
    unet,
    prompts,
    seeds,
    config: OnlineConfig,
    accelerator,
    eta=None,
    guidance=None,
    keep_trajectory: bool = True,
    steps: int | None = None,
):
    """Sample ``prompts`` with ``unet`` (unwrapped) in batches of ``sample_batch_size``:
    one ``Trajectory`` for all of them. ``eta`` and ``guidance`` override the config's; with
    eta 0 (as evaluation samples) no log-probabilities are recorded; ``keep_trajectory=False``
    keeps only the final latents and images; ``steps`` overrides ``sample_steps``."""
    eta = config.eta if eta is None else eta
    guidance = config.guidance_scale if guidance is None else guidance
    batch = config.sample_batch_size
    parts_ = []
    was_training = unet.training
    unet.eval()
    with accelerator.autocast():
        for start in range(0, len(prompts), batch):
            parts_.append(
                sample(
                    parts,
                    prompts[start : start + batch],
                    seeds[start : start + batch],
                    steps or config.sample_steps,
                    guidance,
                    eta,
                    config.resolution,
                    unet=unet,
                    log_probs=eta > 0,
                    keep_trajectory=keep_trajectory,
                )
            )
    unet.train(was_training)
    return Trajectory.cat(parts_)


def score_and_gather(accelerator, reward, prompts: list[str], images) -> tuple:
    """Score this process's images, then gather every process's prompts and rewards (in rank
    order). Returns ``(local rewards (N,), all prompts, all rewards (N x world,))``."""
    from accelerate.utils import gather_object

    local = reward.score(prompts, images).float().flatten().cpu()
    if not torch.isfinite(local).all():
        raise ValueError(f"the reward gave a non-finite score: {local.tolist()}")
    every = accelerator.gather(local.to(accelerator.device)).cpu()
    all_prompts = gather_object(list(prompts)) if accelerator.num_processes > 1 else list(prompts)
    return local, all_prompts, every


def reward_figures(run: OnlineRun, all_prompts: list[str], all_rewards: torch.Tensor) -> dict:
    """The round's training reward (every process's samples) with the number of prompts it
    averages over, and its running mean over the last ``reward_running_rounds`` rounds."""
    run.reward_history.append(all_rewards.mean().item())
    recent = run.reward_history[-run.config.reward_running_rounds :]
    return {
        "train/reward_mean": run.reward_history[-1],
        "train/reward_std": all_rewards.std().item(),
        "train/reward_prompts": len(set(all_prompts)),
        "train/reward_running_mean": sum(recent) / len(recent),
    }


def own_slice(values: torch.Tensor, accelerator) -> torch.Tensor:
    """This process's part of a gathered (N x world,) tensor."""
    n = len(values) // accelerator.num_processes
    return values[accelerator.process_index * n : (accelerator.process_index + 1) * n]


def minutes_since(started: float) -> float:
    return round((time.time() - started) / 60, 2)


# ----------------------------------------------------------------------------------------------
# The run around the rounds: setup, end of a round, end of the run


@dataclass
class OnlineRun:
    """What an online method's loop works with, made by ``start_run``."""

    config: OnlineConfig
    family: str
    method: str
    accelerator: object
    parts: object  # pickalign.align.models.DiffusionParts
    unet: object  # prepared (what the optimizer steps; forward it to train)
    policy: object  # the same UNet unwrapped (sample with it)
    trainable: list
    optimizer: object
    scheduler: object
    reward: object
    prompts: list[str]
    state: dict  # the resumed checkpoint's state ({"step": 0} when fresh)
    monitor: object | None
    started: float
    reward_history: list[float]  # each round's mean training reward, kept in checkpoints

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)


def start_run(config: OnlineConfig, family: str, method: str, accumulation=None) -> OnlineRun:
    """Check the inputs, make the accelerator, load the model, the reward and the prompts,
    prepare, resume, and monitor once before the first round of a fresh run. ``accumulation``:
    backward passes per optimizer step, if not ``gradient_accumulation_steps``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    require(config.model, "pipeline", "model")
    started = time.time()
    accelerator = make_accelerator(
        config,
        micro_batch_size=config.train_batch_size,
        project=f"{method.lower().replace('-', '_')}_{family}",
        accumulation=accumulation,
    )
    if accelerator.is_main_process:
        write_config(config, config.output_dir)
    seed_everything(config.seed, accelerator)
    prompts = load_prompts(config.prompts, config.max_prompts)
    parts, unet, trainable, _, weight_dtype = setup_unet(config, family, accelerator)
    parts.to(accelerator.device, text_dtype=weight_dtype)
    reward = load_reward(config.reward, accelerator.device)
    optimizer, scheduler = make_optimizer_and_schedule(
        config,
        trainable,
        accelerator,
        config.train_batch_size,
        total_steps=config.max_steps * config.steps_per_round(),
    )
    unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    state = resume(accelerator, config)
    policy = accelerator.unwrap_model(unet)
    monitor = None
    if config.monitor_prompts:

        def sample_as_evaluated(prompts: list[str], seeds: list[int]) -> torch.Tensor:
            guidance = config.monitor_guidance
            images = rollout(
                parts,
                policy,
                prompts,
                seeds,
                config,
                accelerator,
                0.0,
                guidance,
                keep_trajectory=False,
                steps=config.monitor_steps,
            )
            return images.images

        monitor = Monitor(config, reward, accelerator, sample_as_evaluated)
    run = OnlineRun(
        config,
        family,
        method,
        accelerator,
        parts,
        unet,
        policy,
        trainable,
        optimizer,
        scheduler,
        reward,
        prompts,
        state,
        monitor,
        started,
        list(state.get("reward_history", [])),
    )
    if monitor is not None:
        monitor.history = list(state.get("monitor", []))
        if state["step"] == 0:
            monitor(0)
    return run


def end_round(run: OnlineRun, round_: int, logs: dict, **state) -> None:
    """After round ``round_``: log, monitor when due, checkpoint when due (with ``state``, the
    method's own resumable state, and the monitor's history)."""

    config, accelerator = run.config, run.accelerator
    append_log(accelerator, config.output_dir, round_, logs)
    if round_ % config.logging_steps == 0 or round_ == config.max_steps:
        accelerator.log(logs, step=round_)
    if run.monitor is not None and run.monitor.due(round_):
        run.monitor(round_)
    if config.checkpointing_steps and round_ % config.checkpointing_steps == 0:
        writer = release_writer(accelerator, run.unet, config.mode, {"base_model": config.model})
        history = run.monitor.history if run.monitor is not None else []
        save_checkpoint(
            accelerator,
            config,
            round_,
            extra_files=writer,
            monitor=history,
            reward_history=run.reward_history,
            **state,
        )


def finish_run(run: OnlineRun, round_: int, logs: dict, training: list[str], **metrics) -> Path:
    """Write ``<output_dir>/final``: the LoRA (or UNet), ``metrics.json`` (with ``metrics``, the
    last round's figures and the monitor's), the model card, and ``monitor.png``."""

    config, accelerator = run.config, run.accelerator
    accelerator.wait_for_everyone()
    metrics = {
        "rounds": round_,
        "train_minutes": minutes_since(run.started),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "samples": round_ * config.samples_per_round * accelerator.num_processes,
        "final": {k.split("/", 1)[1]: v for k, v in logs.items()},
        **metrics,
    }
    if run.monitor is not None:
        metrics["monitor"] = run.monitor.summary()
        run.monitor.plot(run.out / "monitor.png")
    info = {"base_model": config.model, "method": run.method, "reward": config.reward}
    writer = release_writer(accelerator, run.unet, config.mode, info)
    final = run.out / "final"
    if accelerator.is_main_process:
        source = f"the prompts `{config.prompts}` with the reward `{config.reward}`"
        rate = scaled_learning_rate(config, config.train_batch_size, accelerator.num_processes)
        card = model_card(run.method, config, run.family, training, metrics, source, rate)
        publish(final, writer, metrics, card)
        accelerator.print(f"aligned {run.family.upper()} {config.mode} ({run.method}): {final}")
    accelerator.end_training()
    return final
