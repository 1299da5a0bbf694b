"""The score cycle's fetch policy, the local history it fills, and dropping vanished entities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from faults import Reply, ScriptedServer
from fixtures_unit import STEP, detector_config
from monitor.config import Config
from monitor.detector import DetectorRuntime
from monitor.exporter import Exposition
from monitor.sharding import Shard

NOW = 28_333_393 * 60.0  # a grid point of the 60 s step


def matrix_body(instances: list[str], start: float, steps: int) -> bytes:
    result = [
        {"metric": {"instance": name}, "values": [[start + i * STEP, str(1.0 + i)] for i in range(steps)]}
        for name in instances
    ]
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}).encode()


def runtime_against(server: ScriptedServer, tmp_path, **score) -> DetectorRuntime:
    detector = detector_config(score={"aggregate_steps": 4, **score})
    config = Config.model_validate({
        "prometheus": {"url": server.url, "retries": 0},
        "storage": {"path": str(tmp_path)},
        "detectors": [detector.model_dump()],
    })
    return DetectorRuntime(config, config.detectors[0], Exposition(), Shard(0, 1))


def requested_ranges(server: ScriptedServer) -> list[tuple[float, float]]:
    ranges = {(float(r.params["start"][0]), float(r.params["end"][0])) for r in server.requests}
    return sorted(ranges)


def test_first_cycle_reads_whole_window(tmp_path):
    with ScriptedServer([Reply(body=matrix_body(["node-a"], NOW - 11 * STEP, 12))]) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.score_cycle(now=NOW)
        runtime.close()

    assert requested_ranges(server) == [(NOW - 11 * STEP, NOW)]
    assert runtime.buffer.values.shape == (1, 12, 3)


def test_next_cycle_reads_only_new_steps(tmp_path):
    with ScriptedServer([Reply(body=matrix_body(["node-a"], NOW - 11 * STEP, 12))]) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.score_cycle(now=NOW)
        server.requests.clear()
        runtime.score_cycle(now=NOW + 2 * STEP + 5)
        runtime.close()

    assert requested_ranges(server) == [(NOW + STEP, NOW + 2 * STEP)]
    assert runtime.buffer.end == NOW + 2 * STEP


def test_cycle_without_new_step_reads_nothing(tmp_path):
    with ScriptedServer([Reply(body=matrix_body(["node-a"], NOW - 11 * STEP, 12))]) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.score_cycle(now=NOW)
        server.requests.clear()
        runtime.score_cycle(now=NOW + STEP / 2)
        runtime.close()

    assert server.requests == []


def test_gap_rereads_whole_window(tmp_path):
    with ScriptedServer([Reply(body=matrix_body(["node-a"], NOW - 11 * STEP, 12))]) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.score_cycle(now=NOW)
        server.requests.clear()
        later = NOW + 100 * STEP
        runtime.score_cycle(now=later)
        runtime.close()

    assert requested_ranges(server) == [(later - 11 * STEP, later)]


def test_cycles_fill_local_history(tmp_path):
    with ScriptedServer([Reply(body=matrix_body(["node-a"], NOW - 11 * STEP, 14))]) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.score_cycle(now=NOW)
        runtime.score_cycle(now=NOW + 2 * STEP)
        runtime.close()

    frame = runtime.history.read(NOW - 11 * STEP, NOW + 2 * STEP)
    assert frame.entities == [("node-a",)]
    assert not np.isnan(frame.values).any()
    assert frame.values[0, :, 0].tolist() == [1.0 + i for i in range(14)]


def test_vanished_entity_dropped_after_ttl(tmp_path):
    replies = [Reply(body=matrix_body(["node-a", "node-b"], NOW - 11 * STEP, 12)),
               Reply(body=matrix_body(["node-a"], NOW + STEP, 1))]
    with ScriptedServer(replies) as server:
        runtime = runtime_against(server, tmp_path, entity_ttl="5m")
        runtime.score_cycle(now=NOW)
        assert set(runtime.last_seen) == {("node-a",), ("node-b",)}

        runtime.score_cycle(now=NOW + STEP)
        assert ("node-b",) in runtime.last_seen, "dropped before its ttl ran out"

        runtime.score_cycle(now=NOW + 6 * 60)
        runtime.close()

    assert set(runtime.last_seen) == {("node-a",)}
    assert runtime.buffer.entities == [("node-a",)]


@pytest.mark.parametrize("count", [2, 3])
def test_shard_keeps_own_entities(tmp_path, count):
    from monitor.sharding import shard_of

    names = [f"node-{i}" for i in range(12)]
    with ScriptedServer([Reply(body=matrix_body(names, NOW - 11 * STEP, 12))]) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.shard = Shard(1, count)
        runtime.score_cycle(now=NOW)
        runtime.close()

    expected = sorted((name,) for name in names if shard_of((name,), count) == 1)
    assert runtime.buffer.entities == expected


def test_cold_training_reads_entity_sample(tmp_path):
    from faults import vector_body

    names = [f"node-{i}" for i in range(5)]
    steps = 8 * 60  # train.range of the small detector: 8 h at a 60 s step
    replies = [Reply(body=vector_body([({"instance": name}, NOW, "1") for name in names]))]
    replies += [Reply(body=matrix_body(names, NOW - (steps - 1) * STEP, steps))]
    with ScriptedServer(replies) as server:
        runtime = runtime_against(server, tmp_path)
        runtime.detector = runtime.detector.model_copy(
            update={"train": runtime.detector.train.model_copy(update={"max_entities": 2})})
        frame = runtime.training_frame(NOW)
        runtime.close()

    assert len(frame.entities) == 2
    assert set(frame.entities) <= {(name,) for name in names}
    assert server.requests[0].path.split("?")[0] == "/api/v1/query"
    assert not np.isnan(frame.values).all()
