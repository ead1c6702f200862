"""Run infrastructure every recipe uses: the accelerator, seeding, progress, tracking,
checkpoints with rotation and resume, one-line command-line errors, and atomic outputs (configs
themselves: ``pickalign.config``).

Plain functions, no trainer class: a recipe's loop stays visible in its own module.

Works the same on GPUs and on a CPU-only machine, where three launch modes fail silently
unless handled: on CPU the process group must use gloo (DeepSpeed otherwise asserts on the batch
size), and DeepSpeed needs ``train_micro_batch_size_per_gpu`` when no DataLoader is prepared.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from pickalign.config import RunConfig, config_to_dict

T = TypeVar("T")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "run_state.json"


def write_config(config: Any, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config (defaults, YAML and overrides merged) into the run folder."""
    path = Path(output_dir) / name
    text = f"# Resolved config of this run ({type(config).__name__}).\n"
    text += yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write_text(path, text)
    return path


# ----------------------------------------------------------------------------------------------
# Command-line errors

DEBUG_ENV = "PICKALIGN_DEBUG"


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run a command-line entry point ``main(argv)``. An error is one line on stderr and exit
    status 1 (130 when interrupted); ``--debug`` anywhere in ``argv`` or ``PICKALIGN_DEBUG=1``
    shows the full traceback instead. Returns the exit status (``main``'s int, else 0)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        status = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error becomes one line
        if debug:
            raise
        print(f"error: {one_line(error)} (traceback: --debug or {DEBUG_ENV}=1)", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


def one_line(error: BaseException) -> str:
    """The error's message on one line; the type name when it is not one of pickalign's own
    messages (ValueError, OSError and their kind) or has no message."""
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, OSError, KeyError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Atomic outputs


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place only on success.

    Works for files and folders. A crash inside the block leaves ``final`` as it was (absent or
    the previous version), never half-written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish(
    folder: str | Path,
    write: Callable[[Path], None],
    metrics: dict | None = None,
    card: str | None = None,
) -> Path:
    """Write a folder a user keeps (a run's ``final/``, a reward's ``best/``) whole or not at
    all: ``write(tmp)`` puts the weights into a temporary folder beside it, ``metrics.json`` and
    the model card ``README.md`` join them, and one rename replaces ``folder``. Nothing writes
    into a published folder afterwards (what is measured later goes beside it)."""
    with atomic_path(folder) as tmp:
        write(tmp)
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)
    return Path(folder)


# ----------------------------------------------------------------------------------------------
# Accelerator, seeding, progress, tracking


def make_accelerator(
    config: RunConfig,
    micro_batch_size: int | None = None,
    project: str = "run",
    accumulation: int | None = None,
):
    """An ``Accelerator`` for this run, right on GPUs and on a CPU-only machine.

    ``micro_batch_size`` is handed to DeepSpeed when the recipe prepares no DataLoader (online
    RL, cached tensors); DeepSpeed refuses to start without it. ``accumulation``: backward
    passes per optimizer step, when not ``config.gradient_accumulation_steps`` (DDPO
    backpropagates each trained step of a micro-batch).
    """
    accumulation = accumulation or config.gradient_accumulation_steps
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    handlers, on_cpu = [], not torch.cuda.is_available()
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without gloo, DeepSpeed on CPU picks a backend that miscounts the world size.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    mixed_precision = (
        None if config.mixed_precision in (None, "", "auto") else config.mixed_precision
    )
    log_with = None if config.report_to in (None, "", "none") else config.report_to
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs")
        ),
        kwargs_handlers=handlers,
        # A multi-process launch without CUDA otherwise runs N unsynchronised copies.
        cpu=on_cpu and not use_deepspeed,
    )
    check_world(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        if micro_batch_size is not None:
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        # The run's accumulation wins over a launch config's fixed value, which accelerate
        # would otherwise apply silently (changing the batch per optimizer step).
        plugin.deepspeed_config["gradient_accumulation_steps"] = accumulation
    if log_with is not None:
        accelerator.init_trackers(project, config=_scalar_config(config))
    return accelerator


def check_world(accelerator) -> None:
    """Refuse to train when the launcher started N processes that would each train alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched {launched} processes but the accelerator sees {accelerator.num_processes}"
        )
    if launched > 1 and accelerator.distributed_type.value == "NO":
        raise RuntimeError(
            f"{launched} processes were launched but no process group was set up, so each would "
            "train alone. On a machine without CUDA launch with ACCELERATE_USE_CPU=true."
        )


def _scalar_config(config: Any) -> dict[str, Any]:
    """Trackers (tensorboard hparams) accept only scalars: stringify the rest."""
    flat = {}
    for key, value in config_to_dict(config).items():
        ok = isinstance(value, (int, float, str, bool))
        flat[key] = value if ok else str(value)
    return flat


def seed_everything(seed: int, accelerator=None) -> int:
    """Seed python, numpy and torch with ``seed + process index``; returns the seed used."""
    from accelerate.utils import set_seed

    rank = accelerator.process_index if accelerator is not None else 0
    set_seed(seed + rank)
    return seed + rank


def progress_bar(accelerator, total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar shown on the local main process only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process
    )


def append_log(accelerator, output_dir: str | Path, step: int, figures: dict[str, Any]) -> None:
    """One JSON line ``{"step": step, **figures}`` in ``<output_dir>/log.jsonl``, written by the
    main process: a plain per-step log next to the trackers'."""
    if accelerator.is_main_process:
        with open(Path(output_dir) / "log.jsonl", "a") as log:
            log.write(json.dumps({"step": step, **figures}) + "\n")


def mean_figures(accelerator, sums: dict[str, float], count) -> dict[str, float]:
    """Sums of figures over micro-steps -> their means over every process, as ``train/<name>``.
    ``count``: the micro-steps, or per figure how many values it summed (a figure with none
    anywhere is left out). Every process must hold the same names."""
    names = sorted(sums)
    counts = [count[k] if isinstance(count, dict) else count for k in names]
    totals = torch.tensor([float(sums[k]) for k in names] + counts, device=accelerator.device)
    totals = accelerator.reduce(totals, "sum").cpu().tolist()
    summed, seen = totals[: len(names)], totals[len(names) :]
    return {f"train/{k}": s / n for k, s, n in zip(names, summed, seen) if n > 0}


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop before the optimizer step when the loss is NaN or infinite, naming the step."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"loss is {loss.item()} at step {step}; stopped before the optimizer step. "
            "Lower the learning rate, check the data, or resume from the last checkpoint."
        )


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle fixed by (seed, epoch), so a resumed run sees exactly the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class EpochBatches:
    """A training loop's batches, epoch after epoch, and where the loop stands in them.

    - Each pass sets the epoch of the prepared loader and of its ``skip_first_batches`` copy:
      accelerate re-seeds the sampler with a loader's own epoch count at every pass, which the
      copies never advance (every epoch would replay the first one's order).
    - The position is counted in batches (``state()``, saved in checkpoints), not derived from
      optimizer steps: an epoch that does not divide by the accumulation ends on a short step,
      and a skipped batch makes none.
    - A batch with no usable row (no ``key``) on any process is skipped on every process, so the
      processes' accumulation and collectives stay paired. Its rows are counted with the other
      bad rows by reason; an epoch of nothing but bad rows is an error, not an endless loop.
    """

    def __init__(self, accelerator, loader, key: str, state: dict, accumulation: int = 1):
        self.accelerator, self.loader, self.key = accelerator, loader, key
        if "epoch" in state:
            self.epoch, self.position = state["epoch"], state["batch"]
        else:  # fresh, or a checkpoint from before positions were saved (whole windows)
            epoch, done = divmod(state.get("step", 0), max(1, len(loader) // accumulation))
            self.epoch, self.position = epoch, done * accumulation
        # {row: reason} of the bad rows met (a row met again in a later epoch counts once); a
        # skipped batch is skipped on every process, so each holds the run's count.
        self.bad_rows = {int(row): why for row, why in state.get("bad_rows", {}).items()}
        self.skipped = state.get("skipped_batches", 0)

    def __iter__(self):
        while True:
            self.loader.set_epoch(self.epoch)
            batches = self.accelerator.skip_first_batches(self.loader, self.position)
            if hasattr(batches, "set_epoch"):  # a copy that some accelerate releases start at 0
                batches.set_epoch(self.epoch)
            fresh, used = self.position == 0, 0
            for batch in batches:
                self.position += 1
                self.bad_rows.update(batch.pop("bad_rows"))
                if not self._usable_everywhere(self.key in batch):
                    self.skipped += 1
                    continue
                used += 1
                yield batch
            if fresh and not used:
                reasons = sorted(set(self.bad_rows.values()))
                raise ValueError(
                    f"epoch {self.epoch} held no usable batch: {len(self.bad_rows)} bad rows "
                    f"({', '.join(reasons)}); fix or drop them (pickalign data inspect lists them)"
                )
            self.epoch, self.position = self.epoch + 1, 0

    def _usable_everywhere(self, usable: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return usable
        flag = torch.tensor([0.0 if usable else 1.0], device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() == 0

    def all_bad_rows(self) -> dict[int, str]:
        """{row: reason} of the bad rows every process met (all processes must call it)."""
        from accelerate.utils import gather_object

        if self.accelerator.num_processes == 1:
            return dict(self.bad_rows)
        return {row: why for part in gather_object([self.bad_rows]) for row, why in part.items()}

    def state(self) -> dict[str, Any]:
        """Where the loop stands, for a checkpoint (all processes must call it)."""
        return {
            "epoch": self.epoch,
            "batch": self.position,
            "bad_rows": self.all_bad_rows(),
            "skipped_batches": self.skipped,
        }


# ----------------------------------------------------------------------------------------------
# Optimizers and schedules


def make_optimizer(name: str, parameters, lr: float, weight_decay: float = 0.0):
    """``adamw``, ``adamw_8bit`` (bitsandbytes; state in 8 bit, also on CPU) or ``adafactor``
    (transformers, with a fixed learning rate) over ``parameters`` or parameter groups (a group's
    own ``weight_decay`` wins over ``weight_decay``)."""
    parameters = list(parameters)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=lr,
            weight_decay=weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    raise ValueError(f"optimizer must be adamw, adamw_8bit or adafactor, got {name!r}")


def warmup_schedule(optimizer, warmup: int, total: int, decay: str = "linear"):
    """Linear warmup over ``warmup`` steps (the first step already at 1/warmup of the rate), then
    a ``linear`` or ``cosine`` decay to zero at ``total``."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay == "cosine":
            return 0.5 * (
                1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))
            )
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a crash mid-save leaves only a hidden temp folder)."""
    root = checkpoint_root(output_dir)
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    accelerator, config: RunConfig, step: int, extra_files=None, **state: Any
) -> Path:
    """Save everything needed to resume (models, optimizers, schedulers, RNG states, ``state``).

    ``extra_files(folder)``, when given, runs on the main process to add files (e.g. a LoRA in
    its release format) before the checkpoint is committed. The folder appears under its final
    name only once complete; older ones beyond ``checkpoints_total_limit`` are deleted.
    """
    root = checkpoint_root(config.output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    staging = root / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra_files is not None:
            extra_files(staging)
        atomic_write_json(staging / STATE_FILE, {"step": step, **state})
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in list_checkpoints(config.output_dir)[: -config.checkpoints_total_limit or None]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | Path, spec: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint or None; else that folder."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE} inside)")
    return path


def maybe_resume(accelerator, config: RunConfig, **load_kwargs: Any) -> dict[str, Any]:
    """Restore the checkpoint ``config.resume_from_checkpoint`` names; returns its saved state
    (``{"step": 0}`` when starting fresh). ``load_kwargs`` go to the models' ``load_state_dict``
    (``strict=False`` for checkpoints that hold only the trainable weights)."""
    path = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if path is None:
        if config.resume_from_checkpoint:
            accelerator.print(
                f"no checkpoint in {checkpoint_root(config.output_dir)}; starting fresh"
            )
        return {"step": 0}
    accelerator.load_state(str(path), **load_kwargs)
    state = json.loads((path / STATE_FILE).read_text())
    accelerator.print(f"resumed from {path} at step {state['step']}")
    return state
