"""pickalign.reward: PickScore, the rewards a run can name, the Pick-a-Pic data layer and the
toy world.

Never imports diffusers. Heavy pieces import lazily: ``from pickalign.reward import PickScore``
loads transformers only when used.
"""


def __getattr__(name):
    if name == "PickScore":
        from pickalign.reward.pickscore import PickScore

        return PickScore
    raise AttributeError(f"module 'pickalign.reward' has no attribute {name!r}")
