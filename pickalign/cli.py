"""The ``pickalign`` command line.

pickalign data inspect SOURCE [--split S] [--skip-bad]   count rows, pairs, ties, bad rows
pickalign score --model M --prompt P IMAGE...             PickScore of images for one prompt
pickalign reward-eval --model M --data D                  preference accuracy of a reward
pickalign rank --model PIPE [--lora DIR] --prompt P --n 8 --out DIR   best-of-n by a reward
pickalign eval --config eval.yaml [--FIELD VALUE]          generate, score, compare: report.html
pickalign arena --config arena.yaml [--export DIR]          the preference arena (or its export)
pickalign toy data --out DIR                              a toy dataset in the Pick-a-Pic schema
pickalign toy eval PIPE [--against P | --aligned RUN]     oracle adherence and win rates
pickalign toy rank-eval PIPE [--n 8]                      best-of-n by the toy PickScore, judged
pickalign toy oracle-check                                the oracle's accuracy on renders
pickalign models build --out DIR                          save the tiny offline test models
pickalign demo [--out DIR]                                the whole loop on the toy world

Errors are one line and a non-zero exit; add --debug (or set PICKALIGN_DEBUG=1) for a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _inspect(args: argparse.Namespace) -> int:
    from pickalign.reward.data import BadRowError, PairFilter, inspect_split
    from pickalign.reward.sources import require

    require(args.source, "dataset", "source")

    filters = PairFilter(
        require_label=not args.keep_unlabeled,
        keep_ties=not args.drop_ties,
        require_different=not args.keep_identical,
    )
    status = 0
    for split in args.split:
        print(f"== {args.source} [{split}]")
        try:
            report = inspect_split(args.source, split, skip_bad=args.skip_bad, filters=filters)
        except BadRowError as error:
            print(
                f"error: {error}\n(rerun with --skip-bad to skip and count bad rows)",
                file=sys.stderr,
            )
            return 1
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        print(report.summary())
    return status


def _build_models(args: argparse.Namespace) -> int:
    from pickalign.align.tiny import build_tiny_sd, build_tiny_sdxl
    from pickalign.reward.tiny import build_tiny_clip

    out = Path(args.out)
    for name, build in (
        ("clip", build_tiny_clip),
        ("sd", build_tiny_sd),
        ("sdxl", build_tiny_sdxl),
    ):
        print(f"{name}: {build(out / name)}")
    return 0


def _key_values(items: list[str], flag: str, cast=str) -> dict:
    """``["a=1", "b=2"]`` -> ``{"a": cast("1"), ...}``; a malformed item exits naming ``flag``."""
    try:
        return {k: cast(v) for k, v in (item.split("=", 1) for item in items)}
    except ValueError:
        raise SystemExit(f"{flag}: expected name=value, got {items!r}") from None


def _toy_data(args: argparse.Namespace) -> int:
    from pickalign.eval.toy.data import generate_toy_dataset, with_base_models

    base = {} if args.renders_only else None
    if args.base_model:
        try:
            base = with_base_models(_key_values(args.base_model, "--base-model"))
        except ValueError as error:
            raise SystemExit(f"--base-model: {error}") from None
    mix = _key_values(args.mix.split(","), "--mix", float) if args.mix else None
    sizes = generate_toy_dataset(
        args.out,
        seed=args.seed,
        prompts=args.prompts,
        pairs_per_prompt=args.pairs_per_prompt,
        base_models=base,
        mix=mix,
    )
    for split, rows in sizes.items():
        print(f"{split:18s} {rows} rows")
    print(f"written to {Path(args.out).resolve() / 'data'}")
    return 0


def _oracle_check(args: argparse.Namespace) -> int:
    from pickalign.eval.toy.judge import oracle_accuracy

    print("renders:", oracle_accuracy(args.renders, args.seed))
    if args.vae:
        from pickalign.eval.toy.pretrain import vae_round_trip

        result = oracle_accuracy(args.renders, args.seed, vae_round_trip(args.vae))
        print("VAE reconstructions:", result)
    return 0


def _toy_eval(args: argparse.Namespace) -> int:
    import json

    from diffusers import DiffusionPipeline

    from pickalign.reward.sources import require

    for name in [args.model] + ([args.against] if args.against else []):
        require(name, "pipeline", "model")
    if args.aligned:
        from pickalign.eval.toy.judge import aligned_vs_base

        aligned = args.aligned[0] if len(args.aligned) == 1 else args.aligned
        report = aligned_vs_base(
            args.model,
            aligned,
            args.prompts,
            args.seeds_per_prompt,
            split=args.split,
            reward=args.reward,
        )
        print(json.dumps(report, indent=2))
        return 0

    from pickalign.eval.toy.judge import oracle_compare, sample_held_out

    def sample(folder):
        pipe = DiffusionPipeline.from_pretrained(folder)
        return sample_held_out(pipe, args.split, args.prompts, first_seed=args.seed)

    prompts, images = sample(args.model)
    other = sample(args.against)[1] if args.against else images
    result = oracle_compare(prompts, images, other)
    print(json.dumps({"model": result["a"]}, indent=2))
    if args.against:
        print(json.dumps({"against": result["b"]}, indent=2))
        print(json.dumps({"changes": result["changes"]}, indent=2))
        print(f"win rate of {args.model} over {args.against}: {result['win_rate']}")
    return 0


def _toy_rank(args: argparse.Namespace) -> int:
    import json

    from pickalign.eval.toy.judge import ranking_vs_single
    from pickalign.reward.sources import require
    from pickalign.runtime import atomic_write_json

    require(args.model, "pipeline", "model")
    report = ranking_vs_single(
        args.model, args.reward, args.n, args.prompts, args.split, lora=args.lora
    )
    if args.out:
        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    for key in ("by_reward", "by_oracle"):
        rate = report[f"win_rate_{key}"]
        print(
            f"best of {args.n} {key.replace('_', ' ')} over one sample: {rate['estimate']:.3f} "
            f"[95% CI {rate['low']:.3f}, {rate['high']:.3f}]"
        )
    return 0


def _score(args: argparse.Namespace) -> int:
    from pickalign.reward.data import BadImageError, decode_image
    from pickalign.reward.pickscore import PickScore

    images = []
    for path in args.images:
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 1
        try:
            images.append(decode_image(path))
        except BadImageError as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 1
    scorer = PickScore.from_pretrained(args.model, args.processor)
    scores = scorer.score(args.prompt, images)
    probs = scores.softmax(dim=0)
    width = max(len(p) for p in args.images)
    print(f"{'image':{width}s}  {'score':>8s}  {'p(preferred)':>12s}")
    for path, score, prob in zip(args.images, scores.tolist(), probs.tolist()):
        print(f"{path:{width}s}  {score:8.3f}  {prob:12.3f}")
    return 0


def _reward_eval(args: argparse.Namespace) -> int:
    import json

    from pickalign.reward.evaluate import evaluate_reward
    from pickalign.reward.pickscore import PickScore
    from pickalign.reward.sources import require

    require(args.data, "dataset", "data")
    scorer = PickScore.from_pretrained(args.model, args.processor)
    report = evaluate_reward(scorer, args.data, "skip" if args.skip_bad else "error")
    print(json.dumps(report, indent=2))
    return 0


def _rank(args: argparse.Namespace) -> int:
    from diffusers import DiffusionPipeline

    from pickalign.align.lora import load_lora
    from pickalign.align.models import parts_from_pipeline
    from pickalign.align.prompts import load_prompts
    from pickalign.align.rank import best_of_n, write_ranking
    from pickalign.reward.registry import load_reward
    from pickalign.reward.sources import require

    require(args.model, "pipeline", "model")
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += load_prompts(args.prompts, args.max_prompts)
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or --prompts SOURCE", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DiffusionPipeline.from_pretrained(args.model).to(device)
    if args.lora:
        require(args.lora, "lora", "lora")
        load_lora(pipe, args.lora)
    reward = load_reward(args.reward, device)
    results = best_of_n(
        parts_from_pipeline(pipe),
        prompts,
        reward,
        n=args.n,
        first_seed=args.seed,
        templates=args.template,
        steps=args.steps,
        guidance_scale=args.guidance,
        size=args.size,
    )
    manifest = write_ranking(results, args.out)
    for k, (candidates, _) in enumerate(results):
        best, scores = candidates[0], [c.score for c in candidates]
        print(
            f"{k:04d} best seed {best.seed} score {best.score:.3f} "
            f"(median {sorted(scores)[len(scores) // 2]:.3f}): {best.prompt}"
        )
    print(f"wrote {manifest}")
    return 0


def _config_args(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """What ``parse_config`` reads: ``--config`` and the overrides, or ``--help`` for --fields."""
    if args.fields:
        return ["--help"]
    return (["--config", args.config] if args.config else []) + overrides


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from pickalign.config import parse_config
    from pickalign.eval.suite import EvalConfig, evaluate

    report = evaluate(parse_config(EvalConfig, _config_args(args, overrides), "pickalign eval"))
    if report is not None:
        print(f"report: {report.resolve()}")
    return 0


def _arena(args: argparse.Namespace, overrides: list[str]) -> int:
    import os
    import secrets

    from pickalign.config import parse_config
    from pickalign.eval.arena.config import ArenaConfig

    if not args.config and not args.fields:
        raise SystemExit("pickalign arena: give --config arena.yaml (--fields lists its fields)")
    config = parse_config(ArenaConfig, _config_args(args, overrides), "pickalign arena")
    if args.export:
        from pickalign.eval.arena.export import export
        from pickalign.eval.arena.store import open_engine

        sizes = export(
            open_engine(config.database),
            config.images_dir,
            args.export,
            config.validation_fraction,
            config.test_fraction,
        )
        for split, rows in sizes.items():
            print(f"{split:18s} {rows}")
        print(f"written to {Path(args.export).resolve()}")
        return 0
    import uvicorn

    from pickalign.eval.arena.app import create_app

    token = config.admin_token or os.environ.get("PICKALIGN_ARENA_TOKEN") or secrets.token_hex(16)
    app = create_app(config, token)
    print(f"arena ({config.mode} mode) on http://{config.host}:{config.port}/")
    if not (config.admin_token or os.environ.get("PICKALIGN_ARENA_TOKEN")):
        print(f"admin token for this run: {token}")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pickalign.eval.toy.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pickalign", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="Pick-a-Pic datasets").add_subparsers(
        dest="data_command", required=True
    )
    inspect = data.add_parser("inspect", help="count rows, usable pairs, ties and bad rows")
    inspect.add_argument("source", help="a Hub id (yuvalkirstain/pickapic_v2) or a local folder")
    inspect.add_argument(
        "--split", nargs="+", default=["train"], help="one or more splits (default: train)"
    )
    inspect.add_argument(
        "--skip-bad", action="store_true", help="skip bad rows and count them by reason"
    )
    inspect.add_argument("--drop-ties", action="store_true", help="do not count ties as usable")
    inspect.add_argument("--keep-unlabeled", action="store_true", help="keep has_label=false rows")
    inspect.add_argument(
        "--keep-identical", action="store_true", help="keep are_different=false rows"
    )
    inspect.set_defaults(run=_inspect)

    models = commands.add_parser("models", help="offline test models").add_subparsers(
        dest="models_command", required=True
    )
    build = models.add_parser("build", help="save tiny CLIP, SD and SDXL models to --out")
    build.add_argument("--out", required=True)
    build.set_defaults(run=_build_models)

    toy = commands.add_parser("toy", help="the toy preference world").add_subparsers(
        dest="toy_command", required=True
    )
    toy_data = toy.add_parser("data", help="write a toy dataset in the Pick-a-Pic schema")
    toy_data.add_argument("--out", required=True, help="output folder")
    toy_data.add_argument("--seed", type=int, default=0)
    toy_data.add_argument("--prompts", type=int, default=None, help="train prompts (max 200)")
    toy_data.add_argument("--pairs-per-prompt", type=int, default=4, help="train pairs per prompt")
    sources = toy_data.add_mutually_exclusive_group()
    sources.add_argument(
        "--renders-only", action="store_true", help="no samples from the toy base models"
    )
    sources.add_argument(
        "--base-model",
        action="append",
        metavar="NAME=DIR",
        help="sample this source from another pipeline folder, e.g. toy-sd=outputs/toy/sd/pipeline "
        "(a retrained base); repeatable",
    )
    toy_data.add_argument(
        "--mix",
        help="share of image sides per source, e.g. toy-sd=0.75,render=0.25 (sources: render, "
        "render-wrong-1, render-wrong-2, toy-sd, toy-sdxl, base)",
    )
    toy_data.set_defaults(run=_toy_data)
    check = toy.add_parser("oracle-check", help="the oracle's accuracy on fresh renders")
    check.add_argument("--renders", type=int, default=1000)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--vae", help="also measure on this VAE's reconstructions")
    check.set_defaults(run=_oracle_check)
    toy_eval = toy.add_parser("eval", help="oracle adherence (and win rate) of pipelines")
    toy_eval.add_argument("model", help="a pipeline folder")
    toy_eval.add_argument("--against", help="a second pipeline folder to compare with")
    toy_eval.add_argument(
        "--aligned",
        nargs="+",
        help="DPO output folders (LoRA or unet/), e.g. a run's final/ and checkpoints/*: win rate "
        "of MODEL with each over MODEL alone (the base is sampled once)",
    )
    toy_eval.add_argument("--seeds-per-prompt", type=int, default=2, help="with --aligned")
    toy_eval.add_argument(
        "--reward", help="with --aligned: also the mean of this reward, e.g. the run's"
    )
    toy_eval.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    toy_eval.add_argument("--seed", type=int, default=0, help="first seed (seed i+k for prompt k)")
    toy_eval.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="held-out prompts to judge on: test (200) for figures, validation (50) for tuning",
    )
    toy_eval.set_defaults(run=_toy_eval)
    toy_rank = toy.add_parser(
        "rank-eval", help="oracle win rate of best-of-n by a reward over one sample"
    )
    toy_rank.add_argument("model", help="a pipeline folder")
    toy_rank.add_argument("--lora", help="a LoRA folder to load into it")
    toy_rank.add_argument(
        "--reward", default="pickscore:eval/toy/assets/pickscore", help="the ranking reward"
    )
    toy_rank.add_argument("--n", type=int, default=8)
    toy_rank.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    toy_rank.add_argument("--split", choices=("test", "validation"), default="test")
    toy_rank.add_argument("--out", help="also write the report to this JSON file")
    toy_rank.set_defaults(run=_toy_rank)

    score = commands.add_parser("score", help="PickScore of images for one prompt")
    score.add_argument("--model", required=True, help="reward folder or Hub id")
    score.add_argument("--processor", help="processor folder or Hub id (default: the model's)")
    score.add_argument("--prompt", required=True)
    score.add_argument("images", nargs="+", help="image files")
    score.set_defaults(run=_score)
    reward_eval = commands.add_parser("reward-eval", help="preference accuracy of a reward")
    reward_eval.add_argument("--model", required=True, help="reward folder or Hub id")
    reward_eval.add_argument("--processor", help="processor folder or Hub id")
    reward_eval.add_argument("--data", required=True, help="Pick-a-Pic Hub id or local folder")
    reward_eval.add_argument("--skip-bad", action="store_true", help="skip and count bad rows")
    reward_eval.set_defaults(run=_reward_eval)

    rank = commands.add_parser("rank", help="best-of-n: sample n per prompt, keep the best")
    rank.add_argument("--model", required=True, help="base pipeline (Hub id or folder)")
    rank.add_argument("--lora", help="a LoRA folder to load into it")
    rank.add_argument(
        "--reward",
        default="pickscore",
        help="pickscore[:MODEL], toy-oracle, or module:function (default: PickScore_v1)",
    )
    rank.add_argument("--prompt", action="append", help="a prompt; repeatable")
    rank.add_argument("--prompts", help="more prompts: a .txt file, toy[:SPLIT] or DATASET:SPLIT")
    rank.add_argument("--max-prompts", type=int, help="only the first N of --prompts")
    rank.add_argument("--n", type=int, default=8, help="candidates per prompt (default 8)")
    rank.add_argument("--seed", type=int, default=0, help="candidate j gets seed SEED+j")
    rank.add_argument(
        "--template",
        action="append",
        help="prompt template with {prompt}, e.g. '{prompt}, highly detailed'; repeatable, "
        "candidate j uses template j mod count; the reward scores the prompt as written",
    )
    rank.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    rank.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default 5)")
    rank.add_argument("--size", type=int, help="image size (default: the model's)")
    rank.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    rank.add_argument("--out", required=True, help="folder for the images and ranking.json")
    rank.set_defaults(run=_rank)

    evaluation = commands.add_parser(
        "eval",
        help="evaluate models on a prompt set: images, scores, win rates, report.html",
        description="Evaluate models (eval/suite.py). Any --FIELD VALUE after the config "
        "overrides that field; --fields lists them.",
    )
    evaluation.add_argument("--config", help="an eval YAML, e.g. recipes/configs/eval/toy.yaml")
    evaluation.add_argument("--fields", action="store_true", help="list the config's fields")
    evaluation.set_defaults(run=_eval, takes_overrides=True)

    arena = commands.add_parser(
        "arena",
        help="the preference arena: raters judge pairs into a database; --export writes them",
        description="Serve the arena (eval/arena). Any --FIELD VALUE after the config overrides "
        "that field; --fields lists them.",
    )
    arena.add_argument("--config", help="an arena YAML, e.g. recipes/configs/arena/toy.yaml")
    arena.add_argument(
        "--export", metavar="DIR", help="write the Pick-a-Pic export and judgments.csv, then exit"
    )
    arena.add_argument("--fields", action="store_true", help="list the config's fields")
    arena.set_defaults(run=_arena, takes_overrides=True)

    demo = commands.add_parser(
        "demo", help="the whole loop on the toy world: DPO, online, ranking, report.html"
    )
    demo.add_argument("--out", default="outputs/demo")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pickalign.runtime import run_cli

    def run(argv: list[str]) -> int:
        args, rest = build_parser().parse_known_args(argv)
        if getattr(args, "takes_overrides", False):
            return args.run(args, rest)
        if rest:
            build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
        return args.run(args)

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
