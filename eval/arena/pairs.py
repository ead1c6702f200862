"""Where the arena's images come from.

``Painter`` (generate mode): a configured model, chosen at random, draws the prompt from a random
seed through ``pickalign.align.sampler``; pipelines load once and draw one image at a time under a lock.
``EvalPairs`` (compare mode): two different models' images of the same item of an evaluation's
manifest, chosen at random; an image enters the database once, keyed by its manifest path.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

from pickalign.eval.arena.store import add_image, image_for_source


class Busy(RuntimeError):
    """More draws are waiting than the server lets wait."""


class Painter:
    # Draws wait for one model call at a time; beyond this many waiting, a request is told to
    # come back (429) rather than hold one of the server's threads, which pages and judgments
    # need too.
    MAX_WAITING = 8

    def __init__(self, config, engine):
        self.config, self.engine = config, engine
        self.pipelines: dict[str, object] = {}
        self.lock = threading.Lock()
        self.waiting = threading.BoundedSemaphore(self.MAX_WAITING)
        self.random = random.Random()

    def _pipeline(self, spec):
        if spec.name not in self.pipelines:
            import torch

            from pickalign.eval.generate import ModelSpec, load_pipeline

            model = ModelSpec(spec.name, spec.model, lora=spec.lora, lora_scale=spec.lora_scale)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.pipelines[spec.name] = load_pipeline(model, device)
        return self.pipelines[spec.name]

    def draw(self, prompt: str) -> str:
        """A new image of ``prompt`` by a random model; its uid."""
        from pickalign.align.sampler import generate

        spec = self.random.choice(self.config.models)
        seed = self.random.randrange(2**31)
        if not self.waiting.acquire(blocking=False):
            raise Busy("the models are busy drawing for other raters: try again in a moment")
        try:
            with self.lock:
                image = generate(
                    self._pipeline(spec),
                    [prompt],
                    [seed],
                    self.config.steps,
                    self.config.guidance_scale,
                    self.config.size,
                )[0]
        finally:
            self.waiting.release()
        return add_image(self.engine, Path(self.config.images_dir), image, prompt, spec.name, seed)


class EvalPairs:
    def __init__(self, config, engine):
        self.folder = Path(config.evaluation)
        manifest = self.folder / "manifest.jsonl"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"evaluation {self.folder}: no manifest.jsonl (run pickalign eval first)"
            )
        self.config, self.engine = config, engine
        self.items: dict[int, list[dict]] = {}
        for line in manifest.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                self.items.setdefault(row["index"], []).append(row)
        self.items = {k: rows for k, rows in self.items.items() if len(rows) >= 2}
        if not self.items:
            raise ValueError(f"evaluation {self.folder}: no item has images of two models")
        self.lock = threading.Lock()
        self.random = random.Random()

    def _uid(self, row: dict) -> str:
        from PIL import Image

        with self.lock:  # one stored copy per manifest image, however many raters ask at once
            uid = image_for_source(
                self.engine, row["path"], row["prompt"], row["model"], row["seed"]
            )
            if uid is None:
                image = Image.open(self.folder / row["path"]).convert("RGB")
                uid = add_image(
                    self.engine,
                    Path(self.config.images_dir),
                    image,
                    row["prompt"],
                    row["model"],
                    row["seed"],
                    source=row["path"],
                )
        return uid

    def pair(self) -> tuple[str, str, str]:
        """(prompt, left uid, right uid): two models' images of one item, sides at random."""
        rows = self.random.sample(self.items[self.random.choice(list(self.items))], 2)
        return rows[0]["prompt"], self._uid(rows[0]), self._uid(rows[1])
