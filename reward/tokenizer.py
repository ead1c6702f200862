"""An offline CLIP tokenizer: the real 49,408-token BPE vocabulary that CLIP, PickScore and
Stable Diffusion use, built from the BPE merge list shipped in ``reward/assets``.

The merge list is the file OpenAI released with CLIP (``bpe_simple_vocab_16e6.txt.gz``).
From it we derive the ``vocab.json`` / ``merges.txt`` pair that transformers'
``CLIPTokenizer`` reads, so no hub access is needed.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48,894 merges of the file: 49,408 tokens = 512 byte tokens + merges + 2.
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the rest are moved to code points from 256 up,
    so that BPE never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [byte for byte in range(256) if byte not in printable]
    # Order matters: it fixes the token ids (printable bytes first, then the moved ones).
    mapping = {byte: chr(byte) for byte in printable}
    mapping.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return mapping


@lru_cache(maxsize=1)
def _merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])


def clip_vocab() -> dict[str, int]:
    """The CLIP vocabulary in id order: bytes, bytes ending a word, merges, then BOS/EOS."""
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _merges()] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_vocab_files(folder: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the transformers CLIPTokenizer format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(clip_vocab(), ensure_ascii=False))
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in _merges()) + "\n", encoding="utf-8"
    )
    return vocab_path, merges_path


def build_clip_tokenizer(folder: str | Path, max_length: int = MAX_LENGTH):
    """Save a CLIP tokenizer to ``folder`` (``save_pretrained`` layout) and return it.

    The folder then loads with ``CLIPTokenizer.from_pretrained`` / ``AutoTokenizer``, the same
    code path a Hub id takes.
    """
    import transformers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab_path, merges_path = write_vocab_files(folder / "_bpe")
    # transformers 5 ignores vocab_file=/merges_file= silently; vocab=/merges= are honoured.
    # transformers 4's CLIPTokenizer takes only the former.
    files = (
        {"vocab": str(vocab_path), "merges": str(merges_path)}
        if int(transformers.__version__.split(".")[0]) >= 5
        else {"vocab_file": str(vocab_path), "merges_file": str(merges_path)}
    )
    tokenizer = CLIPTokenizer(
        **files,
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    tokenizer.save_pretrained(folder)
    for path in (vocab_path, merges_path):
        path.unlink()
    (folder / "_bpe").rmdir()
    return CLIPTokenizer.from_pretrained(folder)
