"""Evaluate text-to-image models on a prompt set: images with paired seeds (resumable, spread
over the launched processes), PickScore / CLIP / aesthetic / oracle / plug-in scores, means and
win rates with bootstrap intervals, human win rates from a judgments table, and report.html.

    accelerate launch recipes/evaluate.py --config recipes/configs/eval/pickapic_test_unique.yaml
    python recipes/evaluate.py --config recipes/configs/eval/toy.yaml --max_prompts 50

Same as ``pickalign eval --config ...``. Any ``--FIELD VALUE`` overrides the config; ``--help``
lists the fields. See eval/suite.py.
"""

import sys

from pickalign.config import parse_config
from pickalign.eval.suite import EvalConfig, evaluate
from pickalign.runtime import run_cli


def main(argv: list[str]) -> None:
    report = evaluate(parse_config(EvalConfig, argv))
    if report is not None:
        print(f"report: {report.resolve()}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
