"""pickalign: align text-to-image diffusion models with human preferences.

Three rooms, one way down: ``pickalign.reward`` (PickScore, the Pick-a-Pic data layer, the toy
world), ``pickalign.align`` (Diffusion-DPO, DDPO, reward-weighted and best-of-n fine-tuning,
best-of-n ranking), ``pickalign.eval`` (the evaluation suite, the arena, the toy tools); beside
them ``pickalign.config`` and ``pickalign.runtime`` (what every run shares) and
``pickalign.cli`` (the ``pickalign`` command).

The main names load on first use, so ``import pickalign`` stays light:
``pickalign.PickScore``, ``pickalign.load_reward``, ``pickalign.best_of_n``,
``pickalign.evaluate``.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "PickScore": "pickalign.reward.pickscore",
    "load_reward": "pickalign.reward.registry",
    "load_pickapic": "pickalign.reward.data",
    "best_of_n": "pickalign.align.rank",
    "evaluate": "pickalign.eval.suite",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pickalign' has no attribute {name!r}")
