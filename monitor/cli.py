"""The `anomaly-monitor` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from monitor import __version__, logs
from monitor.config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("ANOMALY_MONITOR_CONFIG"),
                        help="path of the YAML config (default: $ANOMALY_MONITOR_CONFIG)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-monitor", description=(
        "Learn normal behaviour of Prometheus metrics with an LSTM autoencoder and export anomaly scores."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (default: info)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text for people, json for log pipelines (default: text)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the service: score and train on schedule, serve /metrics",
        description="Run the service until SIGTERM or Ctrl-C: score every detector each score.every, "
                    "retrain each train.every, and serve /metrics, /healthz and /readyz on `listen`.")
    _add_config(run)

    check = commands.add_parser("check-config", help="validate a config file")
    _add_config(check)
    check.add_argument("--connect", action="store_true",
                       help="also run every signal's query and check it returns series with the entity labels")

    train = commands.add_parser("train", help="train the models now and save them if they pass their checks")
    _add_config(train)
    train.add_argument("--detector", action="append", help="train only this detector (repeatable)")
    train.add_argument("--reset", action="store_true",
                       help="delete the detector's saved models and history first, and train from scratch")

    backtest = commands.add_parser("backtest", help="score a past range with the saved model; write CSV and a summary")
    _add_config(backtest)
    backtest.add_argument("--from", dest="start", required=True, help="start: RFC 3339, Unix seconds or now-<duration>")
    backtest.add_argument("--to", dest="end", default="now", help="end, same forms (default: now)")
    backtest.add_argument("--out", required=True, help="output folder (created if missing)")
    backtest.add_argument("--detector", action="append", help="only this detector (repeatable)")

    demo = commands.add_parser("demo", help="run Prometheus, node-exporter, a workload and the service on loopback")
    demo.add_argument("--workdir", help="folder for the demo's data (default: a new temporary folder)")
    demo.add_argument("--anomaly", default="cpu", choices=["cpu", "memory", "network"],
                      help="the misbehaviour to inject (default: cpu)")
    demo.add_argument("--learn", type=float, default=90,
                      help="seconds of each of the two learning phases, before and while the service scores (default: 90)")
    demo.add_argument("--anomaly-duration", type=float, default=45, help="seconds the anomaly lasts (default: 45)")
    demo.add_argument("--keep-running", action="store_true", help="leave everything running after the demo until Ctrl-C")

    from monitor.evaluation.cli import add_evaluate_parser

    add_evaluate_parser(commands)
    return parser


def _load(args) -> Config:
    if not args.config:
        raise ConfigError("(none)", ["no config given; pass --config FILE or set ANOMALY_MONITOR_CONFIG"])
    return load_config(args.config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return _dispatch(args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _dispatch(args) -> int:
    if args.command == "demo":
        from monitor.demo import run_demo

        return run_demo(args)

    if args.command == "evaluate":
        from monitor.evaluation.cli import run_evaluate

        return run_evaluate(args)

    config = _load(args)
    if args.command == "check-config":
        from monitor.commands import check_config

        return check_config(config, args.connect)
    if args.command == "run":
        from monitor.commands import run_service

        return run_service(config)
    if args.command == "train":
        from monitor.commands import train_now

        return train_now(config, args.detector, args.reset)
    if args.command == "backtest":
        from monitor.backtest import run_backtest

        return run_backtest(config, args.start, args.end, args.out, args.detector)
    raise AssertionError(args.command)
