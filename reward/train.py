"""Train PickScore: fine-tune both CLIP towers and logit_scale on Pick-a-Pic preference pairs.

The objective is the paper's (``pickalign.reward.losses.preference_loss``), each example weighted by
1 / num_example_per_prompt as the official trainer does; the in-batch-negatives variant of the
paper's section 7 is an option. AdamW (or bitsandbytes' 8-bit AdamW), linear warmup then linear
decay, gradient clipping, bf16 and gradient checkpointing; DDP and DeepSpeed ZeRO-2 through
``accelerate launch``. Validation every ``eval_steps`` keeps the best checkpoint; the run resumes
with ``--resume_from_checkpoint latest``.

The final folder loads with ``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained``
(the model card's usage code runs on it unchanged) and holds ``metrics.json`` and a model card.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pickalign.config import RunConfig
from pickalign.reward.data import (
    BadRowError,
    DataReport,
    DatasetConfig,
    PairFilter,
    decode_row,
    load_pickapic,
    split_bad,
    usable_rows,
)
from pickalign.reward.evaluate import accuracy_report, evaluate_reward, pair_probabilities
from pickalign.reward.losses import in_batch_negatives_loss, preference_loss
from pickalign.reward.pickscore import PickScore, image_embeddings, text_embeddings
from pickalign.reward.sources import require
from pickalign.runtime import (
    EpochBatches,
    EpochSampler,
    append_log,
    check_finite,
    make_accelerator,
    make_optimizer,
    maybe_resume,
    mean_figures,
    progress_bar,
    publish,
    save_checkpoint,
    seed_everything,
    warmup_schedule,
    write_config,
)


@dataclass
class RewardConfig(DatasetConfig, RunConfig):
    model: str = field(
        default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        metadata={"help": "CLIP to fine-tune: a Hub id or a local folder."},
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Build a tiny CLIP from a config (toy world) instead of loading one."},
    )
    keep_ties: bool = field(default=True, metadata={"help": "Train on 0.5/0.5 pairs too."})
    batch_size: int = field(
        default=16, metadata={"range": "> 0", "help": "Pairs per process per micro-batch."}
    )
    learning_rate: float = field(
        default=3e-6, metadata={"range": "> 0", "help": "AdamW peak learning rate."}
    )
    weight_decay: float = field(
        default=0.3, metadata={"range": ">= 0", "help": "AdamW weight decay."}
    )
    warmup_steps: int = field(
        default=500, metadata={"range": ">= 0", "help": "Linear warmup, then linear decay."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"range": "> 0", "help": "Gradient clipping norm."}
    )
    optimizer: str = field(
        default="adamw",
        metadata={"choices": ("adamw", "adamw_8bit"), "help": "'adamw' or 'adamw_8bit'."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory."}
    )
    in_batch_negatives: bool = field(
        default=False, metadata={"help": "Other prompts' images as negatives (paper section 7)."}
    )
    eval_steps: int = field(
        default=500, metadata={"range": ">= 0", "help": "Validate every N steps (0: never)."}
    )
    num_workers: int = field(
        default=0, metadata={"range": ">= 0", "help": "DataLoader worker processes."}
    )
    image_size: int = field(
        default=32, metadata={"range": "> 0", "help": "Image size of a from-scratch CLIP."}
    )
    scratch_width: int = field(
        default=64, metadata={"range": "> 0", "help": "Width of a from-scratch CLIP."}
    )
    scratch_layers: int = field(
        default=3, metadata={"range": "> 0", "help": "Layers per tower, from scratch."}
    )


class PairDataset(torch.utils.data.Dataset):
    """Pick-a-Pic rows -> processor tensors. Rows the filters drop are removed up front from the
    label columns alone (no image is decoded for that); image bytes are decoded per item."""

    def __init__(self, rows, processor, filters: PairFilter, skip_bad: bool):
        self.rows, self.processor, self.filters, self.skip_bad = rows, processor, filters, skip_bad
        self.report = DataReport()  # rows read, dropped by filter, bad labels (under skip)
        self.index = usable_rows(rows, filters, skip_bad, self.report)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        pair = decode_row(self.rows, int(self.index[i]), self.filters, self.skip_bad)
        if isinstance(pair, BadRowError):  # skipped: the collate hands it on to be counted
            return pair
        pixels = self.processor.image_processor(
            images=[pair.image_0, pair.image_1], return_tensors="pt"
        ).pixel_values
        return {
            "prompt": pair.prompt,
            "pixels": pixels,  # (2, 3, S, S)
            "labels": torch.tensor([pair.label_0, pair.label_1]),
            "weight": torch.tensor(1.0 / max(pair.num_example_per_prompt, 1)),
        }


def make_collate(tokenizer):
    def collate(items):
        items, bad = split_bad(items)
        if not items:
            return {"bad_rows": bad}
        tokens = tokenizer(
            [item["prompt"] for item in items],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "pixels": torch.stack([item["pixels"] for item in items]),  # (B, 2, 3, S, S)
            "labels": torch.stack([item["labels"] for item in items]),  # (B, 2)
            "weights": torch.stack([item["weight"] for item in items]),  # (B,)
            "bad_rows": bad,  # {row: reason} of the skipped rows
        }

    return collate


class PreferenceModel(torch.nn.Module):
    """CLIP as one module whose forward embeds a batch of pairs, so DDP / DeepSpeed see a
    normal forward call (their gradient sync hooks on it).

    CLIP's ``logit_scale`` is a 0-dim parameter, which DeepSpeed cannot broadcast; here it lives
    as a 1-element parameter and ``export()`` puts it back for ``save_pretrained``.
    """

    def __init__(self, clip):
        super().__init__()
        self.log_scale = torch.nn.Parameter(clip.logit_scale.detach().clone().reshape(1))
        del clip.logit_scale
        self.clip = clip

    def forward(self, input_ids, attention_mask, pixels):
        b = pixels.shape[0]
        text = text_embeddings(self.clip, input_ids, attention_mask)  # (B, D)
        images = image_embeddings(self.clip, pixels.flatten(0, 1)).view(b, 2, -1)  # (B, 2, D)
        return text, images, self.log_scale.exp()[0]

    def export(self):
        """The CLIPModel with the trained logit_scale in place (shares the other weights)."""
        self.clip.logit_scale = torch.nn.Parameter(self.log_scale.detach().clone().reshape(()))
        return self.clip

    def strip(self) -> None:
        """Undo ``export`` before training continues (one copy of the scale is trained)."""
        del self.clip.logit_scale


def batch_loss(model, batch, in_batch_negatives: bool = False) -> torch.Tensor:
    """The preference loss of one collated batch under ``model`` (a PreferenceModel)."""
    text, images, scale = model(batch["input_ids"], batch["attention_mask"], batch["pixels"])
    labels, weights = batch["labels"], batch["weights"]
    if in_batch_negatives:
        return in_batch_negatives_loss(
            text, images[:, 0], images[:, 1], labels[:, 0], labels[:, 1], scale, weights
        )
    scores = scale * torch.einsum("bd,bkd->bk", text, images)  # (B, 2)
    return preference_loss(scores[:, 0], scores[:, 1], labels[:, 0], labels[:, 1], weights)


def load_model(config: RewardConfig):
    from transformers import CLIPModel, CLIPProcessor

    if config.from_scratch:
        from pickalign.reward.tiny import build_tiny_clip

        folder = Path(config.output_dir) / "init"
        if not (folder / "config.json").exists():
            build_tiny_clip(
                folder,
                image_size=config.image_size,
                seed=config.seed,
                width=config.scratch_width,
                layers=config.scratch_layers,
                projection=config.scratch_width,
            )
        return CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    return CLIPModel.from_pretrained(config.model), CLIPProcessor.from_pretrained(config.model)


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices, none on biases, norms, embeddings and the logit scale."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def validate(model, processor, config: RewardConfig, device) -> dict:
    """Pairwise accuracy on validation_unique (ties excluded) and the protocol figures."""
    from pickalign.reward.data import iter_pairs

    scorer = PickScore(model.eval(), processor, device=device, dtype=torch.float32, freeze=False)
    pairs = list(
        iter_pairs(
            load_pickapic(config.dataset, "validation_unique"),
            on_bad="skip" if config.skip_bad_rows else "error",
        )
    )
    p0, label_0 = pair_probabilities(scorer, pairs)
    model.train()
    report = accuracy_report(p0, label_0, p0, label_0)
    return {
        "val_accuracy_no_ties": report.get("accuracy_no_ties", float("nan")),
        "val_accuracy": report["accuracy"],
    }


def train(config: RewardConfig) -> Path:
    """Train, keep the best checkpoint by validation accuracy, evaluate it on test_unique, and
    write the final folder ``<output_dir>/final``. Returns that folder."""
    if not config.from_scratch:
        require(config.model, "clip", "model")
    require(config.dataset, "dataset", "dataset", config.dataset_build)
    for split in ("validation_unique", "test_unique"):  # read after training: missing, say now
        load_pickapic(config.dataset, split)
    started = time.time()
    accelerator = make_accelerator(config, micro_batch_size=config.batch_size, project="reward")
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        write_config(config, out)
    seed_everything(config.seed, accelerator)
    with accelerator.main_process_first():  # one process builds a from-scratch model's folder
        model, processor = load_model(config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    filters = PairFilter(keep_ties=config.keep_ties)
    rows = load_pickapic(config.dataset, "train", streaming=False)
    dataset = PairDataset(rows, processor, filters, config.skip_bad_rows)
    accelerator.print(
        f"training data: {dataset.report.one_line()} (before reading images: rows with bad "
        "images are counted as they are met, and the final count goes to metrics.json)"
    )
    sampler = EpochSampler(len(dataset), config.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=make_collate(processor.tokenizer),
        num_workers=config.num_workers,
    )
    model = PreferenceModel(model)
    optimizer = make_optimizer(
        config.optimizer, param_groups(model, config.weight_decay), config.learning_rate
    )
    # accelerate steps a prepared scheduler once per process at each optimizer step
    world = accelerator.num_processes
    scheduler = warmup_schedule(optimizer, config.warmup_steps * world, config.max_steps * world)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = maybe_resume(accelerator, config)
    step, best = state["step"], state.get("best_val", -math.inf)
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} usable pairs is less than one batch of {config.batch_size}"
        )
    batches = EpochBatches(accelerator, loader, "pixels", state, config.gradient_accumulation_steps)
    bar = progress_bar(accelerator, config.max_steps, step, desc="reward")
    window, micro = 0.0, 0
    if step < config.max_steps:
        for batch in batches:
            with accelerator.accumulate(model):
                loss = batch_loss(model, batch, config.in_batch_negatives)
                check_finite(loss, step + 1)
                window, micro = window + float(loss.detach()), micro + 1
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            loss_value = mean_figures(accelerator, {"loss": window}, micro)["train/loss"]
            window, micro = 0.0, 0  # the loss over the step's micro-batches
            bar.set_postfix(loss=f"{loss_value:.4f}")
            logs = {"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0]}
            if config.eval_steps and step % config.eval_steps == 0:
                wrapper = accelerator.unwrap_model(model)
                clip = wrapper.export()
                metrics = validate(clip, processor, config, accelerator.device)
                logs.update({f"val/{k}": v for k, v in metrics.items()})
                if metrics["val_accuracy_no_ties"] > best:
                    best = metrics["val_accuracy_no_ties"]
                    if accelerator.is_main_process:
                        save_final_model(clip, processor, out / "best")
                wrapper.strip()
            append_log(accelerator, out, step, logs)
            if step % config.logging_steps == 0 or step == config.max_steps:
                accelerator.log(logs, step=step)
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, config, step, best_val=best, **batches.state())
            if step >= config.max_steps:
                break
    bar.close()
    bad_rows = batches.all_bad_rows()
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model).export()
        # the best weights this run validated (a best/ left by an earlier run is not this run's)
        if best > -math.inf and (out / "best" / "config.json").exists():
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(out / "best")
        minutes = (time.time() - started) / 60
        scorer = PickScore(model, processor, device=accelerator.device, dtype=torch.float32)
        metrics = evaluate_reward(
            scorer, config.dataset, "skip" if config.skip_bad_rows else "error"
        )
        metrics.update(
            train_minutes=round(minutes, 2),
            steps=step,
            best_val_accuracy_no_ties=best,
            skipped_batches=batches.skipped,
            data=dataset.report.with_bad_rows(bad_rows).as_dict(),
            world_size=accelerator.num_processes,
            distributed_type=accelerator.distributed_type.value,
        )
        save_final_model(model, processor, final, metrics, config)
        accelerator.print(f"reward model: {final}\n{metrics}")
    accelerator.end_training()
    return final


def save_final_model(
    model, processor, folder: Path, metrics: dict | None = None, config=None
) -> None:
    """``save_pretrained`` the model and processor, with metrics and a model card when given,
    published whole (``pickalign.runtime.publish``)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    card = model_card(metrics, config) if metrics is not None else None
    publish(folder, write, metrics, card)


def model_card(metrics: dict, config: RewardConfig | None) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pickalign, pickscore, preference-reward, clip]",
        "---",
        "# PickScore-style preference reward (pickalign)",
        "",
        "A CLIP model fine-tuned on Pick-a-Pic-style preference pairs to score how likely a person",
        "prefers an image for a prompt: `logit_scale.exp() * cos(text, image)`.",
        "",
        "```python",
        "from transformers import CLIPModel, CLIPProcessor",
        "",
        "model = CLIPModel.from_pretrained(path)",
        "processor = CLIPProcessor.from_pretrained(path)",
        "```",
        "",
        "Or `pickalign.reward.PickScore.from_pretrained(path).score(prompts, images)`.",
        "",
        "## Evaluation (test_unique, tie threshold chosen on validation_unique)",
        "",
    ]
    for key, value in metrics.items():
        lines.append(f"- {key}: {value}")
    if config is not None:
        lines += [
            "",
            "## Training",
            "",
            f"- data: `{config.dataset}`",
            f"- base: `{config.model}`{' (tiny, from scratch)' if config.from_scratch else ''}",
            f"- steps: {config.max_steps}, lr {config.learning_rate}, batch {config.batch_size}"
            " per process",
        ]
    return "\n".join(lines) + "\n"
