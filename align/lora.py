"""LoRA on a diffusers UNet: add, save and load in the diffusers format, and use the adapter-free
UNet as a reference model.

Saved folders hold ``pytorch_lora_weights.safetensors`` with the adapter config in its metadata
(so a LoRA whose alpha differs from its rank reloads at the right scale) and load into a stock
pipeline with ``pipe.load_lora_weights(folder)``. ``load_lora`` does the same after checking the
LoRA against the pipeline's UNet, so a LoRA made for another architecture fails with a message
that says so instead of loading partly or failing deep inside peft.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pickalign.align.models import unet_family

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Attention projections of every transformer block: the usual Diffusion-DPO / DreamBooth set.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraMismatchError(ValueError):
    """A LoRA that does not fit the UNet it is loaded into."""


def add_lora(
    unet,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    init: str | bool = "gaussian",
) -> None:
    """Freeze ``unet`` and give it a trainable LoRA adapter (lora_B is zero, so at init the
    adapted UNet equals the base). LoRA parameters are kept in fp32 whatever the UNet's dtype."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights=init,
        target_modules=list(targets),
        lora_dropout=dropout,
    )
    unet.add_adapter(config)
    for parameter in lora_parameters(unet):
        parameter.data = parameter.data.float()


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def skip_lora_input_casts(unet) -> None:
    """Stop peft casting each LoRA layer's input to the LoRA weights' dtype.

    With frozen weights in bf16 or fp16 and the LoRA in fp32, peft copies every LoRA input up to
    fp32 and autocast copies it straight back down for the product: the results are bit-identical
    and both copies are wasted work (8% of an SD1.5-sized bf16 step on a CPU). Only for a UNet
    that always runs under autocast: without it, half-precision inputs would meet fp32 weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


@contextlib.contextmanager
def adapters_disabled(unet):
    """The base UNet, LoRA switched off, inside the block: Diffusion-DPO's reference model with no
    second UNet in memory. Pass the unwrapped model under DDP / DeepSpeed."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def adapter_metadata(unet) -> dict:
    """The adapter's LoraConfig as a plain dict (what diffusers stores in the file's metadata)."""
    config = unet.peft_config["default"]
    metadata = config.to_dict()
    for key, value in metadata.items():
        if isinstance(value, set):
            metadata[key] = sorted(value)
    return metadata


def unet_signature(unet) -> dict:
    """The UNet facts a LoRA depends on, saved next to it so a mismatch can be named."""
    keys = ("block_out_channels", "cross_attention_dim", "addition_embed_type", "sample_size")
    return {k: _plain(unet.config.get(k)) for k in keys}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def save_lora(unet, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the adapter of ``unet`` (unwrapped) as ``folder/pytorch_lora_weights.safetensors`` in
    the diffusers format, with its config as metadata, plus ``pickalign_lora.json``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # peft key names (``lora_A`` / ``lora_B``), which diffusers loads for every target module;
    # its older "lora.down" naming covers only attention projections, so mixing targets such as
    # proj_in or ff with it would make load_lora_weights drop the attention adapters.
    layers = get_peft_model_state_dict(unet)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    family = unet_family(unet.config)
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=adapter_metadata(unet)
    )
    info = {"family": family, "unet": unet_signature(unet), **(extra or {})}
    (folder / "pickalign_lora.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder / WEIGHT_NAME


def read_lora(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHT_NAME} in {folder}")
    return load_file(path)


_MARKERS = {".lora.down.": "in", ".lora_A.": "in", ".lora.up.": "out", ".lora_B.": "out"}


def _lora_target(name: str) -> tuple[str, str] | None:
    """(layer name, "in" or "out") of a LoRA matrix key, or None for other keys."""
    for marker, side in _MARKERS.items():
        if marker in name:
            return name.split(marker)[0], side
    return None


def check_lora_fits(state: dict[str, torch.Tensor], unet, source: str = "LoRA") -> None:
    """Raise ``LoraMismatchError`` unless every LoRA matrix in ``state`` (diffusers or peft key
    names, with or without the ``unet.`` prefix) targets a layer of ``unet`` with its shapes."""
    modules = dict(unet.named_modules())
    problems = []
    for key, tensor in state.items():
        if key.startswith("text_encoder"):
            continue
        found = _lora_target(key.removeprefix("unet."))
        if found is None:
            continue
        layer_name, side = found
        layer = modules.get(layer_name)
        layer = getattr(layer, "base_layer", layer)
        if layer is None or not hasattr(layer, "weight"):
            problems.append(f"{layer_name}: no such layer")
            continue
        wanted = layer.weight.shape[1] if side == "in" else layer.weight.shape[0]
        got = tensor.shape[1] if side == "in" else tensor.shape[0]
        if wanted != got:
            problems.append(f"{layer_name}: LoRA {side} size {got}, layer has {wanted}")
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 3 else ""
        )
        raise LoraMismatchError(
            f"{source} was not made for this UNet ({unet_family(unet.config)}, block_out_channels="
            f"{list(unet.config.block_out_channels)}, cross_attention_dim="
            f"{unet.config.cross_attention_dim}): {shown}"
        )


def load_lora(pipe, folder: str | Path, adapter_name: str | None = None):
    """``pipe.load_lora_weights(folder)`` after checking that the LoRA fits ``pipe.unet``.
    Returns the pipeline."""
    folder = Path(folder)
    info_path = folder / "pickalign_lora.json"
    if info_path.exists():
        made_for = json.loads(info_path.read_text()).get("family")
        here = unet_family(pipe.unet.config)
        if made_for and made_for != here:
            raise LoraMismatchError(
                f"LoRA in {folder} was made for an {made_for.upper()} UNet; "
                f"this pipeline ({type(pipe).__name__}) has an {here.upper()} UNet"
            )
    state = read_lora(folder)
    check_lora_fits(state, pipe.unet, source=f"LoRA in {folder}")
    from diffusers.utils import logging as diffusers_logging

    before = set(getattr(pipe.unet, "peft_config", {}) or {})
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoders" per load
    try:
        # The file is named: diffusers 0.35 refuses to guess it when the Hub is offline.
        pipe.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name=adapter_name)
    finally:
        diffusers_logging.set_verbosity(level)
    added = set(getattr(pipe.unet, "peft_config", {}) or {}) - before
    # diffusers skips keys it does not recognise with only a warning: make that an error.
    wanted = {found[0] for key in state if (found := _lora_target(key.removeprefix("unet.")))}
    loaded = {
        name
        for name, module in pipe.unet.named_modules()
        if any(a in getattr(module, "lora_A", {}) for a in added)
    }
    if not wanted <= loaded:
        missing = sorted(wanted - loaded)
        raise LoraMismatchError(
            f"LoRA in {folder}: {len(missing)} of {len(wanted)} adapted layers did not load "
            f"(e.g. {missing[0]}); its key names are not in a format diffusers reads"
        )
    return pipe
