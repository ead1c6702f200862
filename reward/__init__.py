"""pickalign.reward: PickScore, the Pick-a-Pic data layer and the run infrastructure.

Never imports diffusers. Heavy pieces import lazily: ``from reward import PickScore`` loads
transformers only when used.
"""


def __getattr__(name):
    if name == "PickScore":
        from reward.pickscore import PickScore

        return PickScore
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
