"""The toy CLIP: the toy world's image-text model, pretrained contrastively before it sees a
single preference, as CLIP-H was pretrained on LAION-2B before PickScore fine-tuned it. The toy
PickScore (``recipes/configs/reward/toy.yaml``) starts from it.

Its "web" covers every attribute combination (all 450 captions, held-out prompts included: web
data covers concepts beyond any preference set), never a base model's sample:

- renders, varied by the renderer's jitter;
- their reconstructions through the toy VAE, so generated-looking images are in the diet;
- morphs: the VAE decoding of a latent part-way between two renders that differ in one attribute
  (a diamond turning into a cross, a red fading into an orange), captioned by what the oracle
  reads in them. The bases draw such in-between shapes and shades; renders alone never show where
  one name ends and the next begins.

Training is CLIP's: the symmetric InfoNCE loss ``CLIPModel(return_loss=True)`` computes, on
batches of distinct captions (every caption once per batch at the default 450, so no caption is
its own negative), AdamW with warmup and cosine decay. Resumable; the image pool is written once
to ``<output_dir>/web.npz``. ``<output_dir>/final`` loads with ``CLIPModel.from_pretrained`` and
``CLIPProcessor.from_pretrained`` and holds ``metrics.json``: zero-shot top-1 retrieval of test
prompt renders among all 450 captions, and how often its reading of the shipped bases' samples of
test prompts agrees with the oracle's, attribute by attribute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pickalign.config import RunConfig
from pickalign.reward.toyworld import (
    ATTRIBUTE_NAMES,
    COLOURS,
    SHAPES,
    Attributes,
    all_attributes,
    prompt_splits,
    read_image,
    render,
)
from pickalign.reward.train import param_groups
from pickalign.runtime import (
    atomic_path,
    check_finite,
    make_accelerator,
    make_optimizer,
    maybe_resume,
    progress_bar,
    publish,
    save_checkpoint,
    seed_everything,
    warmup_schedule,
    write_config,
)

TOY_VAE = Path(__file__).parent / "assets" / "sd" / "vae"


@dataclass
class ToyClipConfig(RunConfig):
    vae: str = field(
        default=str(TOY_VAE),
        metadata={"help": "The toy VAE that makes reconstructions and morphs."},
    )
    renders_per_caption: int = field(
        default=16, metadata={"range": "> 0", "help": "Renders of each of the 450 captions."}
    )
    morphs_per_caption: int = field(
        default=16, metadata={"range": ">= 0", "help": "Latent morphs starting from each caption."}
    )
    patch_size: int = field(default=8, metadata={"range": "> 0", "help": "Vision patch size (px)."})
    vision_width: int = field(default=128, metadata={"range": "> 0", "help": "Vision width."})
    text_width: int = field(default=64, metadata={"range": "> 0", "help": "Text tower width."})
    layers: int = field(default=4, metadata={"range": "> 0", "help": "Layers per tower."})
    batch_size: int = field(
        default=450, metadata={"range": "[2, 450]", "help": "Distinct captions per batch."}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"range": "> 0", "help": "Peak AdamW rate."}
    )
    weight_decay: float = field(default=0.1, metadata={"range": ">= 0", "help": "AdamW decay."})
    warmup_steps: int = field(
        default=50, metadata={"range": ">= 0", "help": "Linear warmup, then cosine decay."}
    )
    eval_prompts: int = field(
        default=200, metadata={"range": "> 0", "help": "Test prompts of the zero-shot figures."}
    )
    bases: list[str] = field(
        default_factory=lambda: ["eval/toy/assets/sd", "eval/toy/assets/sdxl"],
        metadata={"help": "Base pipelines whose test-prompt samples the final reading check uses."},
    )


def toy_clip_config(config: ToyClipConfig):
    from transformers import CLIPConfig

    from pickalign.reward.tokenizer import MAX_LENGTH

    def tower(width: int) -> dict:
        return dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=config.layers,
            num_attention_heads=max(2, width // 64),
            projection_dim=config.vision_width,
        )

    text = dict(
        vocab_size=49408,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **tower(config.text_width),
    )
    vision = dict(image_size=32, patch_size=config.patch_size, **tower(config.vision_width))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.vision_width)


# ----------------------------------------------------------------------------------------------
# The web


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> (N, 3, 32, 32) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _neighbour(attributes: Attributes, rng) -> Attributes:
    """``attributes`` with one of colour, shape, background changed (colours stay distinct)."""
    while True:
        values = dict(zip(ATTRIBUTE_NAMES, attributes.as_tuple()))
        name = ATTRIBUTE_NAMES[rng.integers(3)]
        choices = SHAPES if name == "shape" else list(COLOURS)
        values[name] = choices[rng.integers(len(choices))]
        other = Attributes(**values)
        if other != attributes and other.colour != other.background:
            return other


@torch.no_grad()
def build_web(config: ToyClipConfig) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining pool: uint8 images (N, 32, 32, 3) and caption indices into
    ``all_attributes()`` (N,). Renders and their reconstructions keep the render's caption;
    morphs take the oracle's reading (dropped when it reads nothing or an invalid combination)."""
    from diffusers import AutoencoderKL

    combos = all_attributes()
    index = {a: i for i, a in enumerate(combos)}
    rng = np.random.default_rng(config.seed)
    k = config.renders_per_caption
    renders = np.stack([np.asarray(render(a, rng)) for a in combos for _ in range(k)])
    labels = np.repeat(np.arange(len(combos)), k)
    vae = AutoencoderKL.from_pretrained(config.vae).eval()

    latents = torch.cat(  # every render encoded once: the round trips and morphs share them
        [
            vae.encode(_to_unit(renders[i : i + 512])).latent_dist.mean
            for i in range(0, len(renders), 512)
        ]
    )

    def decode(z: torch.Tensor) -> np.ndarray:
        return np.concatenate(
            [_to_uint8(vae.decode(z[i : i + 512]).sample) for i in range(0, len(z), 512)]
        )

    recons = decode(latents)
    starts, ends = [], []
    for i, attributes in enumerate(combos):
        for _ in range(config.morphs_per_caption):
            starts.append(i * k + rng.integers(k))
            ends.append(index[_neighbour(attributes, rng)] * k + rng.integers(k))
    images, captions = [renders, recons], [labels, labels]
    if starts:
        alpha = torch.from_numpy(rng.uniform(0.2, 0.8, len(starts))).float().view(-1, 1, 1, 1)
        z = (1 - alpha) * latents[starts] + alpha * latents[ends]
        morphs = decode(z)
        seen = [read_image(Image.fromarray(m)) for m in morphs]
        keep = [i for i, s in enumerate(seen) if s in index]
        images.append(morphs[keep])
        captions.append(np.array([index[seen[i]] for i in keep], dtype=labels.dtype))
    return np.concatenate(images), np.concatenate(captions)


def load_or_build_web(config: ToyClipConfig, accelerator) -> tuple[np.ndarray, np.ndarray]:
    path = Path(config.output_dir) / "web.npz"
    if not path.exists() and accelerator.is_main_process:
        images, captions = build_web(config)
        with atomic_path(path) as tmp:
            np.savez(tmp, images=images, captions=captions)
    accelerator.wait_for_everyone()
    with np.load(path) as web:
        return web["images"], web["captions"]


# ----------------------------------------------------------------------------------------------
# Training


def build_toy_clip(config: ToyClipConfig, folder: Path) -> Path:
    """A randomly initialised toy CLIP and its ``CLIPProcessor``, saved to ``folder`` whole."""
    from pickalign.reward.tiny import save_new_clip

    with atomic_path(folder) as tmp:
        save_new_clip(tmp, toy_clip_config(config), config.seed)
    return folder


def normaliser(processor):
    """uint8 (N, 32, 32, 3) -> normalised pixels, as the processor makes them from 32 px images."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)

    def normalise(images: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std

    return normalise


def check_inputs(config: ToyClipConfig) -> None:
    """Refuse a missing VAE or base pipeline before any work (the bases are read at the end)."""
    from pickalign.reward.sources import ArtefactError, require

    if not (Path(config.vae) / "config.json").exists():
        raise ArtefactError(
            f"vae: {config.vae} is not a VAE folder (no config.json); the toy one is {TOY_VAE}"
        )
    for base in config.bases:
        require(base, "pipeline", "bases")


def train(config: ToyClipConfig) -> Path:
    """Pretrain, judge zero-shot, write ``<output_dir>/final``; returns that folder."""
    from transformers import CLIPModel, CLIPProcessor

    check_inputs(config)
    started = time.time()
    out = Path(config.output_dir)
    accelerator = make_accelerator(config, project="toy_clip")
    if accelerator.is_main_process:
        write_config(config, out)
    seed_everything(config.seed, accelerator)
    images, captions = load_or_build_web(config, accelerator)
    if accelerator.is_main_process and not (out / "init" / "config.json").exists():
        build_toy_clip(config, out / "init")
    accelerator.wait_for_everyone()
    model = CLIPModel.from_pretrained(out / "init")
    processor = CLIPProcessor.from_pretrained(out / "init")
    normalise = normaliser(processor)
    tokens = processor.tokenizer(
        [a.prompt for a in all_attributes()], padding=True, return_tensors="pt"
    )
    by_caption = [np.flatnonzero(captions == c) for c in range(len(tokens.input_ids))]
    groups = param_groups(model, config.weight_decay)
    optimizer = make_optimizer("adamw", groups, config.learning_rate)
    scheduler = warmup_schedule(optimizer, config.warmup_steps, config.max_steps, "cosine")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start = maybe_resume(accelerator, config)["step"]
    bar = progress_bar(accelerator, config.max_steps, start, desc="toy clip")
    device = accelerator.device
    for step in range(start + 1, config.max_steps + 1):
        rng = np.random.default_rng([config.seed, step])  # a resumed run draws the same batches
        chosen = rng.permutation(len(by_caption))[: config.batch_size]
        rows = np.array([by_caption[c][rng.integers(len(by_caption[c]))] for c in chosen])
        loss = model(
            input_ids=tokens.input_ids[chosen].to(device),
            attention_mask=tokens.attention_mask[chosen].to(device),
            pixel_values=normalise(images[rows]).to(device),
            return_loss=True,
        ).loss
        check_finite(loss, step)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.logging_steps == 0:
            accelerator.log(
                {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=step
            )
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, config, step)
    bar.close()
    final = out / "final"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model).eval()
        minutes = (time.time() - started) / 60
        metrics = zero_shot(model, processor, config.eval_prompts, config.bases)
        metrics.update(
            train_minutes=round(minutes, 2), steps=config.max_steps, web_images=len(images)
        )

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        publish(final, write, metrics, model_card(metrics, config))
        accelerator.print(f"toy CLIP: {final}\n{metrics}")
    accelerator.end_training()
    return final


# ----------------------------------------------------------------------------------------------
# Zero-shot figures


@torch.no_grad()
def read_captions(model, processor, images: list[Image.Image]) -> list[Attributes]:
    """What the toy CLIP reads in each image: the best of all 450 captions (zero-shot)."""
    from pickalign.reward.pickscore import image_embeddings, text_embeddings

    combos = all_attributes()
    tokens = processor.tokenizer([a.prompt for a in combos], padding=True, return_tensors="pt")
    text = text_embeddings(model, tokens.input_ids, tokens.attention_mask)  # (450, D)
    pixels = normaliser(processor)(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    chunks = [image_embeddings(model, pixels[i : i + 500]) for i in range(0, len(pixels), 500)]
    best = (torch.cat(chunks) @ text.T).argmax(dim=1)  # (N,)
    return [combos[i] for i in best.tolist()]


def zero_shot(model, processor, prompts: int = 200, bases: list[str] | None = None) -> dict:
    """Top-1 retrieval of renders of the first ``prompts`` test prompts among all 450 captions;
    for each base pipeline, how often the toy CLIP's reading of its samples of the same prompts
    (seed i, 20 DDIM steps, guidance 5) agrees with the oracle's, per attribute (images the oracle
    cannot read left out)."""
    from pickalign.eval.toy.judge import sample_held_out
    from pickalign.eval.toy.pretrain import load_toy_pipeline

    test = prompt_splits()["test"][:prompts]
    rng = np.random.default_rng(12345)
    renders = [render(a, rng) for a in test]
    read = read_captions(model, processor, renders)
    report = {"test_render_retrieval": sum(r == a for r, a in zip(read, test)) / len(test)}
    for base in bases or []:
        _, samples = sample_held_out(load_toy_pipeline(base), "test", prompts)
        pairs = [
            (seen, clip)
            for seen, clip in zip(
                map(read_image, samples), read_captions(model, processor, samples)
            )
            if seen is not None
        ]
        agreement = {
            name: sum(getattr(s, name) == getattr(c, name) for s, c in pairs) / len(pairs)
            for name in ATTRIBUTE_NAMES
        }
        report[f"agreement_with_oracle/{Path(base).name}"] = {**agreement, "images": len(pairs)}
    return report


def model_card(metrics: dict, config: ToyClipConfig) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [pickalign, clip, toy-world]",
        "---",
        "# Toy CLIP (pickalign's toy world)",
        "",
        "A small CLIP pretrained contrastively on the toy world's image-caption pairs (renders,",
        "VAE reconstructions and latent morphs of all 450 captions). The toy PickScore is",
        "fine-tuned from it. Loads with `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained`;",
        "`clip:<this folder>` names it as a CLIP-score reward.",
        "",
        "## Zero-shot figures",
        "",
        *[f"- {key}: {value}" for key, value in metrics.items()],
        "",
        "## Training",
        "",
        f"- {config.max_steps} steps of {config.batch_size} captions, lr {config.learning_rate},"
        f" patch {config.patch_size}, widths {config.vision_width} / {config.text_width},"
        f" {config.layers} layers per tower",
    ]
    return "\n".join(lines) + "\n"
