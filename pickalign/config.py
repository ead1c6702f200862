"""Configs: one loader for every recipe and command.

A config is a dataclass whose fields declare their help text and what they accept (metadata
``range`` or ``choices``). ``parse_config`` reads ``--config file.yaml`` plus ``--FIELD VALUE``
overrides into it; entries of a list field may themselves be dataclasses (an evaluation's models,
an arena's models), written as mappings in the YAML and made by the config's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work: names the field, the value and what is allowed."""


def in_range(value, spec: str) -> bool:
    """``value`` against a range written next to its field: ``"> 0"``, ``">= 1"``, ``"[0, 1]"``,
    ``"[0, 1)"``, ``"(0, 1]"``; lists are checked item by item."""
    if isinstance(value, (list, tuple)):
        return all(in_range(item, spec) for item in value)
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        above = value >= low if spec[0] == "[" else value > low
        below = value <= high if spec[-1] == "]" else value < high
        return above and below
    op, bound = spec.split()
    return {">": value > float(bound), ">=": value >= float(bound)}[op]


def check_fields(config) -> None:
    """Refuse a value outside its field's declared ``range`` or ``choices`` (field metadata).
    None is always allowed for an optional field; it means "off" or "the default"."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        choices = item.metadata.get("choices")
        if choices is not None and value not in choices:
            allowed = ", ".join(map(str, choices))
            raise ConfigError(f"{item.name}: got {value!r}, expected one of {allowed}")
        spec = item.metadata.get("range")
        if spec is not None and not in_range(value, spec):
            raise ConfigError(f"{item.name}: got {value!r}, expected {spec}")


@dataclass
class RunConfig:
    """Settings shared by every recipe. Algorithm configs add their own fields to these.

    Each field declares what it accepts next to it (metadata ``range`` or ``choices``); values
    are checked when the config is made, before anything loads. Subclasses check combinations
    in their own ``__post_init__`` after calling this one.
    """

    output_dir: str = field(
        default="outputs/run",
        metadata={"help": "Folder for checkpoints, logs and final artefacts."},
    )
    seed: int = field(
        default=0, metadata={"help": "Base seed; each process adds its rank.", "range": ">= 0"}
    )
    max_steps: int = field(
        default=100, metadata={"help": "Optimizer steps to train for.", "range": "> 0"}
    )
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": "Overrides the launch config ('auto': keep the launch config's).",
            "choices": ("no", "bf16", "fp16", "auto"),
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches accumulated per optimizer step.", "range": "> 0"},
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "A tracker accelerate knows ('tensorboard', 'wandb', ...) or 'none'."},
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log metrics every N steps.", "range": "> 0"}
    )
    checkpointing_steps: int = field(
        default=500,
        metadata={"help": "Save a resumable checkpoint every N steps (0: never).", "range": ">= 0"},
    )
    checkpoints_total_limit: int = field(
        default=3,
        metadata={
            "help": "Keep at most this many checkpoints (oldest are deleted).",
            "range": "> 0",
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' for the newest in output_dir."},
    )

    def __post_init__(self):
        # An optional field takes 'none' or '' for None, so the command line can switch off
        # what a config file sets (e.g. a cache folder).
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            optional = type(None) in typing.get_args(hints[item.name])
            if optional and isinstance(value, str) and value.lower() in ("", "none"):
                setattr(self, item.name, None)
        check_fields(self)


def parse_config(config_type, args: list[str] | None = None, prog: str | None = None):
    """Parse ``--config file.yaml`` plus ``--flag value`` overrides into ``config_type``, or into
    each of a tuple of config types (returned as a tuple; a key goes to the type that has it).

    Unknown keys in the YAML or on the command line, and values a field does not accept, are
    one-line errors that name them (exit status 2). ``--help`` lists every field with its help
    text, its default and what it accepts. A field that may be None takes ``none`` or ``''``.
    A flag is a field's whole name (no abbreviations: a typo is an error, not another field).
    ``prog`` names the command in messages (default: the script's name).
    """
    types_ = list(config_type) if isinstance(config_type, tuple) else [config_type]
    parser = _config_parser(types_, prog)
    try:
        configs = parser.parse_args_and_config(args=args)
    except (ValueError, OSError) as error:  # unknown keys, bad values, a missing config file
        parser.error(str(error))
    return tuple(configs) if isinstance(config_type, tuple) else configs[0]


def _config_parser(config_types: list, prog: str | None = None):
    from transformers import HfArgumentParser
    from trl import TrlParser

    class ConfigParser(TrlParser):
        @staticmethod
        def _parse_dataclass_field(parser, item: dataclasses.Field):
            # ``range`` and ``choices`` are checked by the config itself (values from a YAML file
            # never pass argparse's checks); here they only join the help text.
            metadata = dict(item.metadata)
            accepts = [metadata.pop("range", None)]
            choices = metadata.pop("choices", None)
            if choices:
                accepts.append("one of " + ", ".join(map(str, choices)))
            accepts = "; ".join(a for a in accepts if a)
            if accepts:
                metadata["help"] = f"{metadata.get('help', '')} [{accepts}]".strip()
            if _structured(item.type):  # a mapping or a list of entries: YAML on the command line
                required = item.default is dataclasses.MISSING
                required = required and item.default_factory is dataclasses.MISSING
                default = None if required else item.default
                if item.default_factory is not dataclasses.MISSING:
                    default = item.default_factory()
                parser.add_argument(
                    f"--{item.name}",
                    type=_yaml_value,
                    default=default,
                    required=required,
                    help=f"{metadata.get('help', '')} (YAML)".strip(),
                )
                return
            item = copy.copy(item)
            item.metadata = types.MappingProxyType(metadata)
            HfArgumentParser._parse_dataclass_field(parser, item)

        def error(self, message):  # one line, no usage block
            self.exit(2, f"{self.prog}: error: {message}\n")

    return ConfigParser(
        config_types,
        prog=prog,
        allow_abbrev=False,
        epilog=entries_help(config_types),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _entry_type(hint) -> type | None:
    """X of a field typed ``list[X]`` (or ``list[X] | None``) when X is a dataclass."""
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is list:
            (entry,) = typing.get_args(candidate)
            if dataclasses.is_dataclass(entry):
                return entry
    return None


def _structured(hint) -> bool:
    """A dict field, or a list of dataclass entries (optional or not)."""
    dicts = any(c is dict or typing.get_origin(c) is dict for c in (hint, *typing.get_args(hint)))
    return dicts or _entry_type(hint) is not None


def _yaml_value(text: str):
    """A structured override as YAML (JSON is YAML): ``--runs '{dpo: outputs/dpo}'``."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"not YAML: {' '.join(str(error).split())}") from None


def entry_types(config_type) -> dict[str, type]:
    """The list fields of ``config_type`` whose entries are dataclasses: name -> entry type."""
    hints = typing.get_type_hints(config_type).items()
    return {name: _entry_type(hint) for name, hint in hints if _entry_type(hint) is not None}


def entries_help(config_types: list) -> str:
    """The fields of each list field's entries, for ``--help``."""
    lines = []
    for config_type in config_types:
        for name, entry in entry_types(config_type).items():
            lines.append(f"each entry of {name} (a mapping in the YAML):")
            for item in dataclasses.fields(entry):
                required = item.default is dataclasses.MISSING
                required = required and item.default_factory is dataclasses.MISSING
                default = "required" if required else f"default {item.default!r}"
                lines.append(f"  {item.name}: {item.metadata.get('help', '')} ({default})")
    return "\n".join(lines)
