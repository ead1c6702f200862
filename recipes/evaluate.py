"""Evaluate text-to-image models on a prompt set: images with paired seeds (resumable, spread
over the launched processes), PickScore / CLIP / aesthetic / oracle / plug-in scores, means and
win rates with bootstrap intervals, human win rates from a judgments table, and report.html.

    accelerate launch recipes/evaluate.py --config recipes/configs/eval/pickapic_test_unique.yaml
    python recipes/evaluate.py --config recipes/configs/eval/toy.yaml --max_prompts 50

Same as ``pickalign eval --config ...``. Any ``--FIELD VALUE`` overrides the config; ``--fields``
lists the fields. See eval/suite.py.
"""

import sys

from eval.suite import config_help, evaluate, load_config
from reward.runtime import run_cli


def main(argv: list[str]) -> None:
    if "--fields" in argv or "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + config_help())
        return
    if len(argv) < 2 or argv[0] != "--config":
        raise SystemExit("usage: recipes/evaluate.py --config EVAL.yaml [--FIELD VALUE ...]")
    report = evaluate(load_config(argv[1], argv[2:]))
    if report is not None:
        print(f"report: {report.resolve()}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
