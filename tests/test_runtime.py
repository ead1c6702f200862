import json
from dataclasses import dataclass, field

import pytest
import torch
import yaml

from pickalign.config import RunConfig, parse_config
from pickalign.runtime import (
    atomic_path,
    check_finite,
    list_checkpoints,
    make_accelerator,
    maybe_resume,
    save_checkpoint,
    seed_everything,
    write_config,
)


@dataclass
class ToyConfig(RunConfig):
    learning_rate: float = field(default=0.1, metadata={"help": "Step size of SGD."})
    width: int = field(default=4, metadata={"help": "Input width of the toy model."})


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 0.5, "max_steps": 7, "width": 3}))
    config = parse_config(ToyConfig, ["--config", str(path), "--width", "9"])
    assert (config.learning_rate, config.max_steps, config.width) == (0.5, 7, 9)


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("learnig_rate: 0.5\n")
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--config", str(path)])
    assert "learnig_rate" in capsys.readouterr().err


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--widht", "3"])
    assert "--widht" in capsys.readouterr().err


def test_help_lists_fields_with_their_docs(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--help"])
    out = capsys.readouterr().out
    assert (
        "--learning_rate" in out
        and "Step size of SGD." in out
        and "--resume_from_checkpoint" in out
    )


def test_resolved_config_is_written(tmp_path):
    config = ToyConfig(output_dir=str(tmp_path), width=5)
    written = yaml.safe_load(write_config(config, tmp_path).read_text())
    assert written["width"] == 5 and written["learning_rate"] == 0.1


def test_atomic_path_leaves_nothing_behind_on_a_crash(tmp_path):
    final = tmp_path / "model"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("v1")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("half-writ")
        raise RuntimeError("killed")
    assert (final / "weights.bin").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_check_finite_names_the_step():
    check_finite(torch.tensor(1.0), step=3)
    with pytest.raises(FloatingPointError, match="at step 12"):
        check_finite(torch.tensor(float("nan")), step=12)


def train_toy(config: ToyConfig) -> dict[int, float]:
    """A complete tiny training loop on the runtime helpers; returns {step: loss}."""
    accelerator = make_accelerator(config, project="toy")
    seed_everything(config.seed, accelerator)
    model = torch.nn.Linear(config.width, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start = maybe_resume(accelerator, config)["step"]
    losses = {}
    for step in range(start + 1, config.max_steps + 1):
        x = torch.randn(8, config.width)  # drawn from the global RNG: resume must restore it
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        check_finite(loss, step)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses[step] = loss.item()
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, config, step)
    accelerator.end_training()
    return losses


def test_resume_gives_the_same_later_losses(tmp_path):
    full = train_toy(ToyConfig(output_dir=str(tmp_path / "a"), max_steps=8, checkpointing_steps=4))
    cut = ToyConfig(output_dir=str(tmp_path / "b"), max_steps=4, checkpointing_steps=4)
    first = train_toy(cut)
    assert first == {s: full[s] for s in range(1, 5)}
    torch.manual_seed(12345)  # the checkpoint, not the caller's RNG, must decide what follows
    resumed = train_toy(
        ToyConfig(
            output_dir=str(tmp_path / "b"),
            max_steps=8,
            checkpointing_steps=4,
            resume_from_checkpoint="latest",
        )
    )
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == pytest.approx({s: full[s] for s in range(5, 9)}, rel=1e-6)


def test_checkpoints_rotate_and_partial_ones_are_ignored(tmp_path):
    config = ToyConfig(
        output_dir=str(tmp_path), max_steps=6, checkpointing_steps=1, checkpoints_total_limit=2
    )
    train_toy(config)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-6"]
    assert (
        json.loads((tmp_path / "checkpoints/checkpoint-6/run_state.json").read_text())["step"] == 6
    )
    (tmp_path / "checkpoints/checkpoint-9").mkdir()  # a save killed halfway: no run_state.json
    assert list_checkpoints(tmp_path)[-1].name == "checkpoint-6"
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))  # tensorboard logging


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    losses = train_toy(
        ToyConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            resume_from_checkpoint="latest",
            checkpointing_steps=0,
        )
    )
    assert sorted(losses) == [1, 2]


def test_nan_loss_stops_before_the_optimizer_step(tmp_path):
    config = ToyConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=float("inf"))
    with pytest.raises(FloatingPointError, match="at step 2"):
        train_toy(config)


def rows_loader(accelerator, bad: set[int], size: int = 10, batch_size: int = 2):
    """A prepared loader of row indices in EpochSampler order; rows in ``bad`` come back as
    bad rows, as the pair datasets' collate hands them on."""
    from pickalign.runtime import EpochSampler

    def collate(rows):
        good = [r for r in rows if r not in bad]
        batch = {"bad_rows": {r: "corrupt image" for r in rows if r in bad}}
        return batch | ({"rows": torch.tensor(good)} if good else {})

    loader = torch.utils.data.DataLoader(
        list(range(size)), batch_size, sampler=EpochSampler(size, seed=3), collate_fn=collate
    )
    return accelerator.prepare(loader)


def test_epoch_batches_reshuffle_each_epoch_and_resume_at_the_batch():
    from accelerate import Accelerator

    from pickalign.runtime import EpochBatches

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader = rows_loader(accelerator, bad=set())
    batches = EpochBatches(accelerator, loader, "rows", {"step": 0}, accumulation=2)
    seen, steps, saved = [], 0, None
    for batch in batches:  # 5 batches an epoch: two windows of 2, then a short one of 1
        with accelerator.accumulate(torch.nn.Linear(1, 1)):
            seen.append(batch["rows"].tolist())
        steps += accelerator.sync_gradients
        if steps == 4 and accelerator.sync_gradients and saved is None:
            saved, at = batches.state(), len(seen)
        if len(seen) == 15:
            break
    epochs = [sum(seen[i : i + 5], []) for i in (0, 5, 10)]
    assert all(sorted(rows) == list(range(10)) for rows in epochs)  # each row once an epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    assert saved == {"epoch": 1, "batch": 2, "bad_rows": {}, "skipped_batches": 0}
    resumed = EpochBatches(accelerator, loader, "rows", json.loads(json.dumps(saved)), 2)
    rest = [batch["rows"].tolist() for _, batch in zip(range(15 - at), resumed)]
    assert rest == seen[at:]


def test_epoch_batches_skip_a_bad_batch_and_stop_on_an_epoch_of_bad_rows():
    from accelerate import Accelerator

    from pickalign.runtime import EpochBatches

    accelerator = Accelerator(cpu=True)
    # rows 3 and 6 make the first batch of epoch 0 (EpochSampler(10, seed=3)'s order)
    batches = EpochBatches(accelerator, rows_loader(accelerator, bad={3, 6}), "rows", {})
    first_epoch = [batch["rows"].tolist() for _, batch in zip(range(4), batches)]
    assert sorted(sum(first_epoch, [])) == [0, 1, 2, 4, 5, 7, 8, 9]
    assert batches.skipped == 1
    assert batches.all_bad_rows() == {3: "corrupt image", 6: "corrupt image"}
    hopeless = EpochBatches(accelerator, rows_loader(accelerator, bad=set(range(10))), "rows", {})
    with pytest.raises(ValueError, match="epoch 0 held no usable batch: 10 bad rows"):
        next(iter(hopeless))
