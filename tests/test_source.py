"""PrometheusSource against fake servers: retries, final errors, malformed bodies, headers, TLS.

A real Prometheus cannot be made to hang or to return a 503 on demand, so these cases use the
servers in faults.py. The chunking of range queries runs against a real Prometheus
in test_frames.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from faults import HungServer, Reply, ScriptedServer, refused_url, self_signed_certificate, vector_body
from monitor.config import PrometheusConfig
from monitor.source import PrometheusSource, QueryError

# Small timeouts and a 1 ms backoff keep the retry tests fast; the retry count is what they check.
FAST = {"timeout": "500ms", "retries": 2, "retry_backoff": "1ms"}


def make_source(url: str, **settings) -> tuple[PrometheusSource, list[str]]:
    """Build a source that records the reason of every failed attempt."""
    reasons: list[str] = []
    config = PrometheusConfig(url=url, **{**FAST, **settings})
    return PrometheusSource(config, on_error=reasons.append), reasons


def error_reply(status: int) -> Reply:
    return Reply(status, json.dumps({"status": "error", "errorType": "test", "error": f"status {status}"}).encode())


def test_timeout_retried_then_raised():
    with HungServer() as server:
        source, reasons = make_source(server.url, timeout="200ms")
        with pytest.raises(QueryError) as caught:
            source.query_instant("up")
        source.close()

    assert caught.value.reason == "timeout"
    assert reasons == ["timeout"] * 3
    assert server.accepted == 3


def test_connection_refused_retried_then_raised():
    source, reasons = make_source(refused_url())
    with pytest.raises(QueryError) as caught:
        source.query_instant("up")
    source.close()

    assert caught.value.reason == "connection"
    assert reasons == ["connection"] * 3


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_retried_then_raised(status: int):
    with ScriptedServer([error_reply(status)]) as server:
        source, reasons = make_source(server.url)
        with pytest.raises(QueryError) as caught:
            source.query_instant("up")
        source.close()

    assert caught.value.reason == "http_5xx"
    assert len(server.requests) == 3
    assert reasons == ["http_5xx"] * 3


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_retryable_status_then_success(status: int):
    with ScriptedServer([error_reply(status), Reply()]) as server:
        source, reasons = make_source(server.url)
        series = source.query_instant("up")
        source.close()

    assert len(server.requests) == 2
    assert len(reasons) == 1
    assert series[0].labels == {"instance": "node-a"}
    assert series[0].values.tolist() == [1.0]


def test_408_and_429_counted_as_4xx():
    with ScriptedServer([error_reply(408), error_reply(429), Reply()]) as server:
        source, reasons = make_source(server.url)
        source.query_instant("up")
        source.close()

    assert reasons == ["http_4xx", "http_4xx"]


@pytest.mark.parametrize("status", [400, 422])
def test_bad_query_status_not_retried(status: int):
    with ScriptedServer([error_reply(status), Reply()]) as server:
        source, reasons = make_source(server.url)
        with pytest.raises(QueryError) as caught:
            source.query_instant("up")
        source.close()

    assert caught.value.reason == "http_4xx"
    assert caught.value.retryable is False
    assert len(server.requests) == 1
    assert f"status {status}" in str(caught.value)


MALFORMED = {
    "not_json": Reply(200, b"<html>proxy login</html>", "text/html"),
    "status_error": Reply(200, json.dumps({"status": "error", "error": "x"}).encode()),
    "no_data": Reply(200, json.dumps({"status": "success"}).encode()),
    "string_result": Reply(200, json.dumps(
        {"status": "success", "data": {"resultType": "string", "result": [1700000000, "text"]}}).encode()),
    "result_not_list": Reply(200, json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": {"a": 1}}}).encode()),
    "sample_not_pair": Reply(200, json.dumps(
        {"status": "success", "data": {"resultType": "vector",
                                       "result": [{"metric": {}, "value": [1, 2, 3]}]}}).encode()),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_body_is_bad_response(case: str):
    with ScriptedServer([MALFORMED[case], Reply()]) as server:
        source, _ = make_source(server.url)
        with pytest.raises(QueryError) as caught:
            source.query_instant("up")
        source.close()

    assert caught.value.reason == "bad_response"
    assert len(server.requests) == 1


def test_bad_response_counted():
    with ScriptedServer([MALFORMED["string_result"]]) as server:
        source, reasons = make_source(server.url)
        with pytest.raises(QueryError):
            source.query_instant("up")
        source.close()

    assert reasons == ["bad_response"]


def test_special_values_parsed():
    body = vector_body([({"i": "a"}, 1.0, "NaN"), ({"i": "b"}, 1.0, "+Inf"), ({"i": "c"}, 1.0, "-Inf")])
    with ScriptedServer([Reply(200, body)]) as server:
        source, _ = make_source(server.url)
        series = source.query_instant("up")
        source.close()

    values = [s.values[0] for s in series]
    assert np.isnan(values[0])
    assert values[1] == np.inf
    assert values[2] == -np.inf


def test_request_headers_and_params():
    with ScriptedServer() as server:
        source, _ = make_source(server.url, headers={"X-Scope-OrgID": "team-a"})
        source.query_instant("sum(up)", at=1700000000.0)
        source.close()

    request = server.requests[0]
    assert request.path == "/api/v1/query"
    assert request.params == {"query": ["sum(up)"], "time": ["1700000000.000"]}
    assert request.headers.get("Accept-Encoding") == "identity"
    assert request.headers.get("X-Scope-OrgID") == "team-a"
    assert "Authorization" not in request.headers


def test_accept_encoding_configurable():
    with ScriptedServer() as server:
        source, _ = make_source(server.url, accept_encoding="gzip")
        source.query_instant("up")
        source.close()

    assert server.requests[0].headers.get("Accept-Encoding") == "gzip"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    created = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    if created is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available to create a certificate")
    return created


def test_tls_verification_on_by_default(certificate):
    with ScriptedServer(tls_context=certificate.server_context()) as server:
        source, reasons = make_source(server.url, retries=0)
        with pytest.raises(QueryError) as caught:
            source.query_instant("up")
        source.close()

    assert caught.value.reason == "connection"
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert server.requests == []


def test_tls_with_ca_file_succeeds(certificate):
    with ScriptedServer(tls_context=certificate.server_context()) as server:
        source, _ = make_source(server.url, retries=0, ca_file=certificate.cert_file)
        series = source.query_instant("up")
        source.close()

    assert len(series) == 1
    assert len(server.requests) == 1


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verify_false_accepts_unknown_cert(certificate):
    with ScriptedServer(tls_context=certificate.server_context()) as server:
        source, _ = make_source(server.url, retries=0, tls_verify=False)
        series = source.query_instant("up")
        source.close()

    assert len(series) == 1


def test_points_per_chunk_limits():
    config = PrometheusConfig(max_points_per_query=100, max_samples_per_query=1000)
    source = PrometheusSource(config)

    assert source.points_per_chunk(1) == 100
    assert source.points_per_chunk(50) == 20
    assert source.points_per_chunk(5000) == 1
    source.close()


def test_token_file_reread_per_request(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    with ScriptedServer() as server:
        source, _ = make_source(server.url, bearer_token_file=token_file)
        source.query_instant("up")
        token_file.write_text("second\n")
        source.query_instant("up")
        source.close()

    assert server.requests[0].headers.get("Authorization") == "Bearer first"
    assert server.requests[1].headers.get("Authorization") == "Bearer second"
