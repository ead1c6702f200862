"""The settings of Diffusion-DPO (``pickalign.align.dpo``): the base model and training setup
(``pickalign.align.finetune.UNetTuneConfig``), the pairs (``pickalign.align.pairs.PairDataConfig``), and the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

from pickalign.align.finetune import UNetTuneConfig
from pickalign.align.pairs import PairDataConfig
from pickalign.config import ConfigError


@dataclass
class DPOConfig(PairDataConfig, UNetTuneConfig):
    caption_dropout: float = field(
        default=0.0,
        metadata={
            "range": "[0, 1)",
            "help": "Share of pairs trained unconditionally, with the embedding the pipeline's "
            "guidance uses: zeros where it forces zeros for an empty prompt (SDXL), else ''.",
        },
    )
    uncond_anchor: float = field(
        default=0.0,
        metadata={
            "range": ">= 0",
            "help": "Weight of the unconditional anchor: with caption_dropout, the pairs given the "
            "unconditional embedding are not trained with DPO; instead the policy's prediction "
            "there is held at the reference's (MSE), so the branch that guidance subtracts does "
            "not drift. 0: the paper's caption dropout.",
        },
    )
    loss: str = field(
        default="dpo",
        metadata={"choices": ("dpo", "sft"), "help": "'dpo', or 'sft' (MSE on winners only)."},
    )
    beta: float = field(default=5000.0, metadata={"range": "> 0", "help": "Diffusion-DPO beta."})
    batch_size: int = field(
        default=1, metadata={"range": "> 0", "help": "Pairs per process per micro-batch."}
    )
    pairs_per_step: int | None = field(
        default=None,
        metadata={
            "range": "> 0",
            "help": "Pairs per optimizer step over all processes; sets the accumulation.",
        },
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out split (e.g. 'validation') on which the DPO loss and implicit "
            "accuracy of the policy against the reference are logged every validation_steps "
            "and at the end (uniform timesteps, the same noise each time). 'none' or '' turns "
            "off a split a config file sets."
        },
    )
    validation_steps: int = field(
        default=0,
        metadata={
            "range": ">= 0",
            "help": "Validate every N optimizer steps (0: only at the end).",
        },
    )
    reference_offload: bool = field(
        default=False,
        metadata={"help": "Full mode: keep the reference UNet on the CPU between uses."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "range": "[0, 1)",
            "help": "Keep an exponential moving average of the trained weights (the LoRA, or the "
            "UNet in full mode) with this decay, e.g. 0.99, and validate, checkpoint-release and "
            "save it instead of the last weights (0: off). Its early steps average faster "
            "(decay (1+n)/(10+n) until that is higher). Holds a second copy of the trained "
            "weights. Not with DeepSpeed ZeRO-3.",
        },
    )
    num_workers: int = field(
        default=0, metadata={"range": ">= 0", "help": "DataLoader worker processes."}
    )
    validation_pairs: int = field(
        default=512,
        metadata={"range": "> 0", "help": "Validate on at most this many held-out pairs."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.uncond_anchor and not self.caption_dropout:
            raise ConfigError(
                f"uncond_anchor: got {self.uncond_anchor}, but caption_dropout is 0, so no pair "
                "is anchored; set caption_dropout too, or uncond_anchor 0"
            )
        if self.loss == "sft" and self.uncond_anchor:
            raise ConfigError(
                "uncond_anchor: applies to loss dpo only (loss is 'sft'); set it to 0"
            )
        if self.reference_offload and self.mode == "lora":
            raise ConfigError(
                "reference_offload: applies to mode full only (in lora mode the reference is "
                "the same UNet with its adapters off); set it to false"
            )
