"""The arena's settings (``pickalign arena --config arena.yaml``; ``--fields`` lists them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pickalign.config import ConfigError, check_fields


@dataclass
class ArenaModel:
    """A model that draws images in generate mode."""

    name: str = field(metadata={"help": "Its name in the database and the export (model_0/1)."})
    model: str = field(metadata={"help": "A diffusers pipeline: Hub id or local folder."})
    lora: str | None = field(default=None, metadata={"help": "A LoRA folder."})
    lora_scale: float = field(default=1.0, metadata={"help": "The LoRA's weight.", "range": ">= 0"})


@dataclass
class ArenaConfig:
    mode: str = field(
        metadata={
            "help": "generate: raters write prompts, models draw pairs, the rejected image is "
            "replaced; compare: pairs from an evaluation's images, models hidden.",
            "choices": ("generate", "compare"),
        }
    )
    database: str = field(
        default="sqlite:///outputs/arena/arena.db",
        metadata={"help": "SQLAlchemy URL: SQLite (WAL) or postgresql+psycopg://user@host/db."},
    )
    images_dir: str = field(
        default="outputs/arena/images", metadata={"help": "Where shown images are stored."}
    )
    models: list[ArenaModel] = field(
        default_factory=list, metadata={"help": "generate mode: the models (at least one)."}
    )
    evaluation: str | None = field(
        default=None,
        metadata={"help": "compare mode: an evaluation folder (manifest.jsonl, images/)."},
    )
    steps: int = field(default=20, metadata={"help": "DDIM steps.", "range": ">= 1"})
    guidance_scale: float = field(default=5.0, metadata={"help": "Guidance.", "range": ">= 0"})
    size: int | None = field(default=None, metadata={"help": "Image size.", "range": ">= 8"})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on."})
    port: int = field(default=8000, metadata={"help": "Port.", "range": "[0, 65535]"})
    admin_token: str | None = field(
        default=None,
        metadata={
            "help": "Token for /admin (export, stats). Default: $PICKALIGN_ARENA_TOKEN, else a "
            "random one printed at start."
        },
    )
    max_prompt_chars: int = field(
        default=300,
        metadata={
            "help": "Longest prompt accepted (the database holds 2000).",
            "range": "[1, 2000]",
        },
    )
    max_body_bytes: int = field(
        default=8192, metadata={"help": "Largest request body accepted.", "range": ">= 256"}
    )
    judgments_per_minute: int = field(
        default=120,
        metadata={"help": "Per rater: judgments and new pairs a minute.", "range": ">= 1"},
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Export: share of prompts in validation.", "range": "[0, 1)"}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Export: share of prompts in test.", "range": "[0, 1)"}
    )
    title: str = field(default="pickalign arena", metadata={"help": "The page's title."})

    def __post_init__(self):
        check_fields(self)
        self.models = [m if isinstance(m, ArenaModel) else _model(m) for m in (self.models or [])]
        if self.mode == "generate" and not self.models:
            raise ConfigError("models: generate mode needs at least one model")
        if self.mode == "compare" and not self.evaluation:
            raise ConfigError("evaluation: compare mode needs an evaluation folder")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError("validation_fraction + test_fraction must leave prompts for train")


def _model(entry) -> ArenaModel:
    known = {f.name for f in dataclasses.fields(ArenaModel)}
    if not isinstance(entry, dict) or not {"name", "model"} <= set(entry) <= known:
        raise ConfigError(f"models: each entry needs name and model (keys: {sorted(known)})")
    return ArenaModel(**entry)
