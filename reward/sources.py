"""What a model or dataset argument points at, checked before anything loads.

Recipes take Hub ids or local folders. A local path that does not exist is reported as missing,
never looked up on the Hub; a folder of the wrong kind is named for what it holds (a pipeline
where a CLIP model is needed, a LoRA where a pipeline is needed, an empty folder), so the user
reads one sentence instead of a loader's traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# What each recipe input must be, in words, keyed by kind.
EXPECTED = {
    "pipeline": "a diffusers pipeline folder (with model_index.json) or its Hub id",
    "clip": "a CLIP model folder (config.json with model_type 'clip', as saved by "
    "CLIPModel.save_pretrained or the reward recipe) or its Hub id",
    "dataset": "a Pick-a-Pic dataset: a Hub id or a folder of parquet or arrow files",
}


class ArtefactError(FileNotFoundError):
    """A model or dataset argument that is missing or of the wrong kind (one-line message)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def folder_kind(path: str | Path) -> tuple[str, str]:
    """``(kind, description)`` of an existing path: kind is one of ``pipeline``, ``lora``,
    ``clip``, ``transformers``, ``diffusers``, ``checkpoint``, ``dataset``, ``empty``, ``file``,
    ``other``; the description says what was found, for messages."""
    path = Path(path)
    if path.is_file():
        return "file", f"a file ({path.suffix or 'no extension'}), not a folder"
    names = {p.name for p in path.iterdir()}
    if not names:
        return "empty", "an empty folder"
    if "model_index.json" in names:
        name = _read_json(path / "model_index.json").get("_class_name", "a pipeline")
        return "pipeline", f"a diffusers pipeline ({name})"
    if "pytorch_lora_weights.safetensors" in names or "adapter_config.json" in names:
        return "lora", "LoRA weights (load them on top of their base pipeline)"
    if "run_state.json" in names:
        return "checkpoint", "a training checkpoint (resume it with --resume_from_checkpoint)"
    config = _read_json(path / "config.json") if "config.json" in names else {}
    if config.get("model_type") == "clip":
        return "clip", "a CLIP model"
    if "_class_name" in config:
        return "diffusers", f"one diffusers model ({config['_class_name']})"
    if config.get("model_type"):
        return "transformers", f"a transformers model (model_type {config['model_type']!r})"
    if "dataset_dict.json" in names or "state.json" in names or _has_data_files(path):
        return "dataset", "a dataset"
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    return "other", f"a folder of {len(names)} entries ({shown}) that pickalign does not read"


def _has_data_files(path: Path) -> bool:
    for pattern in ("*.parquet", "*.arrow", "*/*.parquet", "*/*.arrow"):
        if next(path.glob(pattern), None) is not None:
            return True
    return False


def looks_local(name: str) -> bool:
    """A name that can only be a local path: absolute, relative with ./ ../ ~, more than one
    slash (Hub ids are ``name`` or ``org/name``), or its first component exists here."""
    if name.startswith(("/", ".", "~")) or name.count("/") >= 2 or os.sep != "/" and os.sep in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def require(name: str, kind: str, role: str, build: str | None = None) -> Path | None:
    """Check that ``name`` (the ``role`` setting, e.g. ``"model"``) is of ``kind`` (a key of
    :data:`EXPECTED`). Returns the local folder, or None for a Hub id left to the loader.

    A path that does not exist is a missing local path when it looks local, when ``build``
    (the command that makes it) is given, or when the Hub is offline; the message names
    ``build`` when there is one.
    """
    path = Path(name).expanduser()
    if not path.exists():
        local = bool(build) or looks_local(name)
        if local or offline():
            hint = f"; build it with: {build}" if build else ""
            where = "" if local else " (the Hub is offline, so it was read as a local path)"
            raise ArtefactError(f"{role}: {name} does not exist{where}{hint}")
        return None
    found, described = folder_kind(path)
    if found != kind and not (kind == "dataset" and found in ("dataset", "other")):
        raise ArtefactError(f"{role}: {name} holds {described}; expected {EXPECTED[kind]}")
    return path
