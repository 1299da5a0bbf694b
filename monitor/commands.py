"""The work behind the `run`, `check-config` and `train` subcommands."""

from __future__ import annotations

import logging
import threading

import torch

from monitor.config import Config
from monitor.exporter import Exposition
from monitor.frames import entity_key
from monitor.sharding import Shard, ShardError, resolve_index
from monitor.source import PrometheusSource, QueryError

logger = logging.getLogger(__name__)


def run_service(config: Config) -> int:
    from monitor.service import Service

    try:
        service = Service(config)
    except ShardError as error:
        logger.error("%s", error)
        return 2
    except OSError as error:
        logger.error("cannot listen on %s: %s; choose a free address in `listen`", config.listen, error)
        return 1
    service.run_forever()
    return 0


def check_config(config: Config, connect: bool) -> int:
    names = ", ".join(d.name for d in config.detectors)
    print(f"config is valid: {len(config.detectors)} detector(s): {names}")
    if not connect:
        return 0
    source = PrometheusSource(config.prometheus)
    failures = 0
    try:
        for detector in config.detectors:
            for signal, query in detector.signals.items():
                failures += not _check_signal(source, detector.name, detector.entity_labels, signal, query)
    finally:
        source.close()
    if failures:
        print(f"{failures} signal(s) failed; fix what each FAIL line names (the query, or the Prometheus "
              "URL, credentials and TLS settings) before running the service")
        return 1
    print("every signal returned series with the entity labels")
    return 0


def _check_signal(source: PrometheusSource, detector: str, labels: list[str], signal: str, query: str) -> bool:
    where = f"{detector}/{signal}"
    try:
        series = source.query_instant(query)
    except QueryError as error:
        print(f"FAIL {where}: {error}")
        return False
    if not series:
        print(f"FAIL {where}: the query returned no series; check the metric names and that they are scraped")
        return False
    keys = [entity_key(s.labels, labels) for s in series]
    lacking = sum(k is None for k in keys)
    if lacking:
        print(f"FAIL {where}: {lacking} of {len(series)} series lack the entity labels {labels}; "
              f"aggregate with sum by ({', '.join(labels)}) (...)")
        return False
    if len(set(keys)) != len(keys):
        print(f"FAIL {where}: several series per entity; aggregate to one with sum by ({', '.join(labels)}) (...)")
        return False
    print(f"ok   {where}: {len(series)} entities")
    return True


def train_now(config: Config, only: list[str] | None, reset: bool) -> int:
    from monitor.detector import DetectorRuntime

    torch.set_num_threads(config.torch_threads)
    try:
        shard = Shard(resolve_index(config.shard), config.shard.count)
    except ShardError as error:
        logger.error("%s", error)
        return 2
    selected = [d for d in config.detectors if not only or d.name in only]
    unknown = sorted(set(only or ()) - {d.name for d in config.detectors})
    if unknown:
        logger.error("unknown detector(s) %s; configured: %s", unknown, [d.name for d in config.detectors])
        return 2

    failed = 0
    exposition = Exposition()
    for detector in selected:
        runtime = DetectorRuntime(config, detector, exposition, shard, threading.Event())
        runtime.load()
        outcome = runtime.train(reset_first=reset)
        runtime.close()
        accepted = outcome is not None and outcome.accepted
        print(f"{detector.name}: {'accepted' if accepted else 'not accepted'}: {outcome.reason if outcome else 'busy'}")
        failed += not accepted
    return 1 if failed else 0
