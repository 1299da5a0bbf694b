"""Sharding entities across replicas: a partition, stable across processes, index from the host name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.config import ShardConfig
from monitor.sharding import Shard, ShardError, resolve_index, shard_of

ROOT = Path(__file__).resolve().parents[1]
ENTITIES = [(f"node-{i}:9100",) for i in range(200)] + [("shop", f"service-{i}") for i in range(50)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_every_entity_in_exactly_one_shard(count: int):
    shards = [Shard(index, count) for index in range(count)]
    owners = [[shard.index for shard in shards if shard.owns(entity)] for entity in ENTITIES]

    assert all(len(owner) == 1 for owner in owners)


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_every_shard_gets_entities(count: int):
    used = {shard_of(entity, count) for entity in ENTITIES}

    assert used == set(range(count))


def test_label_boundaries_matter():
    # Joining without a separator would put ("ab", "c") and ("a", "bc") in the same shard always.
    differing = [count for count in range(2, 50) if shard_of(("ab", "c"), count) != shard_of(("a", "bc"), count)]

    assert differing


def test_stable_across_processes():
    script = (
        "import json, sys\n"
        "from monitor.sharding import shard_of\n"
        "entities = [tuple(e) for e in json.load(sys.stdin)]\n"
        "print(json.dumps([[shard_of(e, c) for c in range(1, 6)] for e in entities]))\n"
    )
    # A different hash seed in the child process would change hash(), so it must not matter here.
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", script], input=json.dumps(ENTITIES), capture_output=True,
                           text=True, check=True, env=environment, cwd=ROOT)
    in_this_process = [[shard_of(entity, count) for count in range(1, 6)] for entity in ENTITIES]

    assert json.loads(child.stdout) == in_this_process


def test_known_assignment():
    # The first 8 bytes of SHA-256("node-<i>:9100") as a big-endian integer, modulo 3, computed
    # with sha256sum. A change of hash would move entities between replicas during a rollout.
    assert [shard_of((f"node-{i}:9100",), 3) for i in range(8)] == [1, 1, 1, 2, 2, 0, 2, 0]


def test_configured_index_used():
    assert resolve_index(ShardConfig(count=3, index=1), hostname="anything") == 1


@pytest.mark.parametrize("hostname, index", [
    ("anomaly-monitor-0", 0), ("anomaly-monitor-2", 2), ("monitoring-anomaly-monitor-10", 10),
])
def test_auto_index_from_hostname(hostname: str, index: int):
    assert resolve_index(ShardConfig(count=11, index="auto"), hostname=hostname) == index


def test_auto_index_from_hostname_env(monkeypatch):
    monkeypatch.setenv("HOSTNAME", "anomaly-monitor-1")

    assert resolve_index(ShardConfig(count=2, index="auto")) == 1


@pytest.mark.parametrize("hostname", ["anomaly-monitor", "anomaly-monitor-", "anomaly-monitor-x1", "", "pod-1a"])
def test_auto_index_bad_hostname(hostname: str):
    with pytest.raises(ShardError) as caught:
        resolve_index(ShardConfig(count=3, index="auto"), hostname=hostname)

    assert repr(hostname) in str(caught.value)
    assert "ANOMALY_MONITOR_SHARD_INDEX" in str(caught.value)


def test_auto_index_beyond_count():
    with pytest.raises(ShardError) as caught:
        resolve_index(ShardConfig(count=3, index="auto"), hostname="anomaly-monitor-3")

    assert "not below shard.count 3" in str(caught.value)


def test_auto_index_without_hostname_env(monkeypatch):
    monkeypatch.delenv("HOSTNAME", raising=False)

    with pytest.raises(ShardError):
        resolve_index(ShardConfig(count=2, index="auto"))
