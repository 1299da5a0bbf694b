"""Several replicas with different shard indices against one real Prometheus."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from conftest import ServiceProcess, node_config, run_cli
from monitor.localstack import free_port
from monitor.sharding import shard_of

pytestmark = pytest.mark.integration

SHARDS = 2


def scored_entities(metrics: str) -> set[str]:
    return set(re.findall(r'^anomaly_score\{[^}]*instance="([^"]+)"', metrics, flags=re.MULTILINE))


def wait_for_scores(service: ServiceProcess, expected: int, timeout: float = 60) -> set[str]:
    deadline = time.monotonic() + timeout
    entities: set[str] = set()
    while time.monotonic() < deadline:
        entities = scored_entities(service.metrics())
        if len(entities) >= expected:
            return entities
        time.sleep(1)
    return entities


def test_shards_score_every_entity_once(node_stack, node_service, tmp_path):
    owners = {target: shard_of((target,), SHARDS) for target in node_stack.node_targets}
    services = []
    try:
        for index in range(SHARDS):
            config = node_config(node_stack, tmp_path / f"storage-{index}", port=free_port())
            config["shard"] = {"count": SHARDS, "index": index}
            # Three missing 1-second steps in a row make 12 windows gappy, which can be every
            # validation window of this short range, so gaps of up to 5 steps are filled here.
            config["detectors"][0]["score"]["fill_gaps"] = 5
            config_file = tmp_path / f"shard-{index}.yaml"
            config_file.write_text(yaml.safe_dump(config))
            owned = sum(shard == index for shard in owners.values())

            trained = run_cli("train", "--config", str(config_file))
            assert (trained.returncode == 0) == (owned > 0), trained.stdout + trained.stderr

            service = ServiceProcess(config_file, int(config["listen"].rsplit(":", 1)[1]), tmp_path / f"shard-{index}.log")
            service.start()
            services.append((index, owned, service))

        seen: dict[str, int] = {}
        for index, owned, service in services:
            entities = wait_for_scores(service, owned)
            assert len(entities) == owned, f"shard {index} scored {entities}, expected {owned} entities"
            for entity in entities:
                assert entity not in seen, f"{entity} scored by shards {seen[entity]} and {index}"
                seen[entity] = index
                assert owners[entity] == index
            assert f'anomaly_monitor_shard{{count="{SHARDS}",index="{index}"}} 1.0' in service.metrics()
        assert set(seen) == set(node_stack.node_targets)
    finally:
        for _, _, service in services:
            service.stop()
