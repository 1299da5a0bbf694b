"""The `evaluate` subcommand: score labelled data sets with the product and its baselines."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pydantic import ValidationError

from monitor.evaluation.datasets import DATA_DIR_ENV, DATASETS, DatasetError, resolve_data_dir
from monitor.evaluation.names import METHODS

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, found {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, found {text!r}")
    return value


def add_evaluate_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "evaluate", help="train and score labelled data sets; write metrics and baselines",
        description="Run the product's Trainer, scoring and thresholds and the baselines on labelled data "
                    "sets, in the static and the as-deployed protocol, and write tables, the config, the "
                    "seeds and pictures to a results folder.")
    parser.add_argument("--data-dir", help=f"folder holding smd/, asd/, nezha/ and nab/ (default: ${DATA_DIR_ENV})")
    parser.add_argument("--dataset", action="append", choices=DATASETS,
                        help="data set to run (repeatable; default: all of them)")
    parser.add_argument("--units", type=_names, default=[],
                        help="comma-separated unit names, e.g. machine-1-6,omi-1 (default: every unit)")
    parser.add_argument("--max-units", type=int, help="run at most this many units of each data set")
    parser.add_argument("--protocol", choices=["static", "deployed", "both"], default="both",
                        help="static: fit once on the training part; deployed: replay the test part through "
                             "the retraining schedule (default: both)")
    parser.add_argument("--methods", type=_names, default=list(METHODS),
                        help=f"comma-separated methods (default: all): {','.join(METHODS)}")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2],
                        help="seeds of the static protocol's neural models (default: 0,1,2)")
    parser.add_argument("--deployed-seeds", type=int, default=1,
                        help="how many of those seeds the as-deployed replay runs (default: 1)")
    parser.add_argument("--out", help="results folder (default: results/evaluate-<UTC time>)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="units evaluated at once, one process each (default: 1); the results are "
                             "the same as with 1")
    _add_overrides(parser)
    return parser


# Detector settings an evaluation may override; every other setting keeps the service default.
OVERRIDES = {
    "window": ("window", int, "window length in steps"),
    "aggregate_steps": ("score.aggregate_steps", int, "steps whose scores are averaged"),
    "threshold_method": ("threshold.method", str, "chi2, quantile or evt"),
    "false_alarm_rate": ("threshold.false_alarm_rate", float, "target share of normal steps that alarm"),
    "epochs": ("train.epochs", int, "training epochs from scratch"),
    "warm_start_epochs": ("train.warm_start_epochs", int, "training epochs when warm-starting"),
    "max_windows": ("train.max_windows", int, "training windows sampled per fit"),
    "train_every": ("train.every", str, "retraining interval as deployed, a duration such as 6h"),
    "train_range": ("train.range", str, "history each training reads, a duration such as 7d"),
    "hidden_size": ("model.hidden_size", int, "LSTM hidden units"),
    "latent_size": ("model.latent_size", int, "latent vector size"),
}


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detector settings (default: the service's defaults)")
    for option, (_, kind, text) in OVERRIDES.items():
        group.add_argument("--" + option.replace("_", "-"), dest=option, type=kind, help=text)


def run_evaluate(args) -> int:
    from monitor.evaluation.methods import FitError
    from monitor.evaluation.runner import PROTOCOLS, Plan, run

    try:
        data_dir = resolve_data_dir(args.data_dir)
    except DatasetError as error:
        logger.error("%s", error)
        return EXIT_USAGE
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        logger.error("unknown method(s) %s; choose from %s", ", ".join(unknown), ", ".join(METHODS))
        return EXIT_USAGE
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    out = Path(args.out) if args.out else Path("results") / time.strftime("evaluate-%Y%m%dT%H%M%SZ", time.gmtime())
    plan = Plan(
        data_dir=data_dir, out=out, datasets=args.dataset or list(DATASETS), units=args.units,
        max_units=args.max_units, protocols=list(PROTOCOLS) if args.protocol == "both" else [args.protocol],
        methods=args.methods, seeds=args.seeds, deployed_seeds=max(args.deployed_seeds, 1),
        overrides={path: getattr(args, option) for option, (path, _, _) in OVERRIDES.items()
                   if getattr(args, option) is not None},
        jobs=args.jobs, torch_threads=args.torch_threads)
    try:
        return run(plan)
    except ValidationError as error:
        logger.error("invalid detector settings: %s", error)
        return EXIT_USAGE
    except (DatasetError, FitError) as error:
        logger.error("evaluation stopped: %s", error)
        return 1
