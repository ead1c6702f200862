"""Watching an online run for reward hacking: the learned reward and other rewards (in the toy
world, the oracle) on the same held-out samples over training, side by side.

Every ``monitor_every`` rounds, and before the first, the policy samples the monitor prompts with
fixed seeds (``monitor_seeds`` each) as evaluation samples them (deterministic DDIM,
``monitor_guidance``, ``monitor_steps``), and each reward scores the same images.
The figures go to the trackers (tensorboard), ``log.jsonl``, the run's final metrics, and
``monitor.png`` in the run folder: a reward that climbs while the oracle stays flat or falls is
the reward being hacked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pickalign.align.prompts import load_prompts
from pickalign.reward.registry import load_reward
from pickalign.runtime import append_log, atomic_path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


class Monitor:
    """Held-out figures of the policy over training (see the module docstring). ``config`` is
    the online run's (its ``monitor_*`` fields); ``reward`` is the training reward, already
    loaded; ``sample(prompts, seeds)`` draws the policy's images as evaluation does; ``history``
    holds one dict per monitoring."""

    def __init__(self, config, reward, accelerator, sample):
        self.config, self.reward, self.accelerator = config, reward, accelerator
        self.sample = sample
        # monitor_seeds copies of the prompts; an image's seed is its index in this list
        self.prompts = load_prompts(config.monitor_prompts, config.monitor_count)
        self.prompts = self.prompts * config.monitor_seeds
        self.others = {
            spec: load_reward(spec, accelerator.device) for spec in config.monitor_rewards
        }
        self.history: list[dict] = []

    def due(self, round_: int) -> bool:
        return round_ % self.config.monitor_every == 0 or round_ == self.config.max_steps

    @torch.no_grad()
    def __call__(self, round_: int) -> dict:
        """Sample and score; every process takes its share of the prompts. Returns the figures."""
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        mine = list(range(rank, len(self.prompts), world))
        prompts = [self.prompts[i] for i in mine]
        figures = {}
        if prompts:
            images = self.sample(prompts, mine)
            scores = {"reward": self.reward.score(prompts, images)}
            for spec, other in self.others.items():
                scores[spec] = other.score(prompts, images)
            sums = [s.float().sum().cpu() for s in scores.values()]  # a reward may give CUDA
            sums = torch.stack(sums + [torch.tensor(1.0)])
            sums[-1] = len(prompts)
        else:  # more processes than prompts
            sums = torch.zeros(len(self.others) + 2)
        totals = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        names = ["reward", *self.others]
        figures = {f"monitor/{name}": float(totals[i] / totals[-1]) for i, name in enumerate(names)}
        accelerator.log(figures, step=round_)
        append_log(accelerator, self.config.output_dir, round_, figures)
        self.history.append({"round": round_, **figures})
        return figures

    def summary(self) -> dict:
        """First and last figures, and the history, for the run's metrics."""
        if not self.history:
            return {}
        first, last = self.history[0], self.history[-1]
        return {
            "prompts": self.config.monitor_prompts,
            "count": len(self.prompts) // self.config.monitor_seeds,
            "seeds": self.config.monitor_seeds,
            "first": first,
            "last": last,
            "history": self.history,
        }

    def plot(self, path: str | Path) -> Path | None:
        """``monitor.png``: each figure over rounds, each on its own scale (main process)."""
        if not self.accelerator.is_main_process or len(self.history) < 2:
            return None
        names = [k for k in self.history[0] if k != "round"]
        rounds = [h["round"] for h in self.history]
        series = {name: [h[name] for h in self.history] for name in names}
        return plot_curves(path, rounds, series, title="held-out samples over rounds")


def plot_curves(
    path,
    xs: list | dict[str, list],
    series: dict[str, list[float]],
    title: str = "",
    x_label: str = "round",
    shared_scale: bool = False,
) -> Path:
    """A small line plot with PIL. ``xs``: one list for every series, or one per series name.
    Each series is scaled to its own range (printed in the legend), so curves of different units
    share one panel; ``shared_scale`` puts them all on one range instead."""
    from PIL import Image, ImageDraw

    xs = xs if isinstance(xs, dict) else {name: xs for name in series}
    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = margin, width - 16, 40, height - margin
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    draw.text((left, 12), title, fill="black")
    every_x = [x for name in series for x in xs[name]]
    x_low, x_high = min(every_x), max(every_x)
    x_span = (x_high - x_low) or 1
    draw.text((left, bottom + 8), f"{x_label} {x_low:g}", fill="black")
    draw.text((right - 90, bottom + 8), f"{x_label} {x_high:g}", fill="black")
    every_y = [v for values in series.values() for v in values]
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        low, high = (min(every_y), max(every_y)) if shared_scale else (min(values), max(values))
        span = (high - low) or 1
        points = [
            (
                left + (x - x_low) / x_span * (right - left),
                bottom - 8 - (v - low) / span * (bottom - top - 16),
            )
            for x, v in zip(xs[name], values)
        ]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        legend = f"{name}: {values[0]:.3f} -> {values[-1]:.3f} (range {low:.3f}..{high:.3f})"
        draw.text((left + 8, top + 6 + 14 * k), legend, fill=colour)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
