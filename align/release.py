"""What a fine-tuning run releases: a diffusers-format LoRA or a diffusers UNet folder, optionally
the moving average (EMA) of the trained weights, and a model card.

Shared by every alignment method; a method's loop calls ``release_writer`` for checkpoints and
its final folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pickalign.align.lora import save_lora


def keep_only_lora(models, weights, output_dir) -> None:
    """``save_state`` hook: keep only the LoRA tensors of each model's state dict."""
    for i, state in enumerate(weights):
        weights[i] = {k: v for k, v in state.items() if "lora_" in k}


def make_ema(accelerator, decay: float, trainable):
    """The moving average of ``trainable`` (None when ``decay`` is 0), registered so that
    checkpoints hold it and a resumed run continues it."""
    if not decay:
        return None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise ValueError(
            "ema_decay does not work with DeepSpeed ZeRO-3 (each process holds only a shard of "
            "the weights); use ZeRO-2, or ema_decay 0"
        )
    from diffusers.training_utils import EMAModel

    # The average in fp32 whatever the weights' dtype: under DeepSpeed's bf16 the module holds
    # bf16 copies of the weights, and steps of (1 - decay) x a change would round away.
    ema = EMAModel([p.detach().float() for p in trainable], decay=decay, foreach=True)
    accelerator.register_for_checkpointing(ema)
    return ema


@contextlib.contextmanager
def averaged_weights(ema, parameters):
    """Inside the block the parameters hold the moving average (unchanged without one)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def release_writer(accelerator, unet, mode: str, lora_info: dict, ema=None, trainable=()):
    """A function writing the release artefact into a folder: the LoRA in diffusers format (with
    ``lora_info`` in its metadata), or a diffusers UNet folder in ``full`` mode; with ``ema``,
    the moving average of ``trainable``. Gathers the weights on every process (ZeRO-3). With EMA
    the weights are read at write time, on the main process alone: EMA is refused under ZeRO-3,
    where gathering needs every process."""
    if ema is not None:

        def write_averaged(folder: Path) -> None:
            with averaged_weights(ema, trainable):
                release_writer(accelerator, unet, mode, lora_info)(folder)

        return write_averaged
    if mode == "full":
        state = accelerator.get_state_dict(unet)

        def write_unet(folder: Path) -> None:
            accelerator.unwrap_model(unet).save_pretrained(folder / "unet", state_dict=state)

        return write_unet
    inner = accelerator.unwrap_model(unet)

    def write_lora(folder: Path) -> None:
        save_lora(inner, folder, extra=lora_info)

    return write_lora


def model_card(
    method: str,
    config,
    family: str,
    training: list[str],
    metrics: dict,
    source: str,
    learning_rate: float,
) -> str:
    """A diffusers model card for a LoRA or UNet trained by ``method`` from ``config`` (a
    ``UNetTuneConfig``) on ``source`` (the data or prompts, in words) at ``learning_rate`` (the
    optimizer's, after ``scale_lr``); ``training`` adds the method's settings."""
    lora = f", rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank}"
    training = [
        f"mode {config.mode}" + (lora if config.mode == "lora" else ""),
        f"lr {learning_rate:g}, {config.max_steps} steps",
        *training,
    ]
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    kind = "LoRA" if config.mode == "lora" else "UNet"
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {config.model}",
        f"tags: [pickalign, {method.lower()}, {kind.lower()}, {family}]",
        "---",
        f"# {method} {kind} for `{config.model}`",
        "",
        f"Aligned with pickalign's {method} on {source}.",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        f'pipe = {pipeline}.from_pretrained("{config.model}")',
    ]
    if config.mode == "lora":
        lines.append('pipe.load_lora_weights("path/to/this/folder")')
    else:
        lines += [
            "from diffusers import UNet2DConditionModel",
            'pipe.unet = UNet2DConditionModel.from_pretrained("path/to/this/folder/unet")',
        ]
    lines += ["```", "", "## Training", "", *[f"- {line}" for line in training], "", "## Run", ""]
    lines += [f"- {key}: {value}" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"
