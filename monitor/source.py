"""Read series from the Prometheus HTTP API with timeouts, retries and chunking."""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import orjson
import requests
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from monitor.config import PrometheusConfig

logger = logging.getLogger(__name__)

# Only a change of query or range fixes these, so retrying them wastes the budget.
_FINAL_STATUSES = {400, 401, 403, 404, 405, 406, 413, 414, 422}
_RETRY_STATUSES = {408, 429}


class QueryError(Exception):
    """A failed Prometheus request; `reason` is the label used in the error counter."""

    def __init__(self, reason: str, message: str, retryable: bool):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    timestamps: np.ndarray  # Unix seconds, float64
    values: np.ndarray  # float64; NaN and ±Inf kept as Prometheus sent them


def _read_secret_file(path: os.PathLike) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def _read_secret_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise QueryError("config", f"environment variable {name} is empty or not set; export the secret in it", False)
    return value


class PrometheusSource:
    """One Prometheus endpoint, with the config's auth, TLS and retry policy."""

    def __init__(self, config: PrometheusConfig, on_error: Callable[[str], None] | None = None):
        self.config = config
        self._on_error = on_error or (lambda reason: None)
        session = requests.Session()
        # requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override a session's `verify`, which
        # would ignore ca_file and tls_verify: false. So `verify` goes with every request too.
        self._verify = str(config.ca_file) if config.ca_file else config.tls_verify
        session.verify = self._verify
        self.client = PrometheusConnect(
            url=config.url,
            headers=dict(config.headers),
            # read=False lets a read timeout surface as requests.Timeout. With only total=0, urllib3
            # wraps it in MaxRetryError, which requests reports as a ConnectionError.
            retry=Retry(total=0, read=False, raise_on_status=False),
            session=session,
            timeout=config.timeout,
        )

    def close(self) -> None:
        self.client.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": self.config.accept_encoding, **self.config.headers}
        token = None
        if self.config.bearer_token_file is not None:
            # Read per request, because mounted tokens are rotated in place.
            token = _read_secret_file(self.config.bearer_token_file)
        elif self.config.bearer_token_env is not None:
            token = _read_secret_env(self.config.bearer_token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _auth(self) -> tuple[str, str] | None:
        auth = self.config.basic_auth
        if auth is None:
            return None
        if auth.password_file is not None:
            return auth.username, _read_secret_file(auth.password_file)
        return auth.username, _read_secret_env(auth.password_env)

    def _get_once(self, path: str, params: dict) -> dict:
        url = f"{self.config.url}{path}"
        try:
            response = self.client._session.request(
                "GET",
                url,
                params=params,
                headers=self._headers(),
                auth=self._auth(),
                timeout=self.config.timeout,
                verify=self._verify,
            )
        except requests.Timeout as error:
            raise QueryError("timeout", f"request to {url} timed out after {self.config.timeout:g}s: {error}", True) from None
        except requests.ConnectionError as error:
            raise QueryError("connection", f"cannot connect to {url}: {error}", True) from None
        except OSError as error:
            raise QueryError("connection", f"request to {url} failed: {error}", True) from None
        return _decode(response, url)

    def get(self, path: str, params: dict) -> dict:
        """Send a GET to the API, retrying the failures that a later try can fix."""
        attempt = 0
        while True:
            try:
                return self._get_once(path, params)
            except QueryError as error:
                self._on_error(error.reason)
                if not error.retryable or attempt >= self.config.retries:
                    raise
                delay = self.config.retry_backoff * (2**attempt) * (0.5 + random.random())
                logger.warning("query failed (%s), retry %d of %d in %.1fs: %s",
                               error.reason, attempt + 1, self.config.retries, delay, error)
                time.sleep(delay)
                attempt += 1

    def query_instant(self, query: str, at: float | None = None) -> list[Series]:
        params = {"query": query}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", params)
        return self._parse(data)

    def query_range(self, query: str, start: float, end: float, step: float, series_hint: int = 1) -> list[Series]:
        """Run a range query over [start, end], split into chunks under the point and sample limits.

        Chunks cover disjoint runs of grid points `start + k * step`, so the seams neither drop nor
        repeat a step. `series_hint` is the expected series count, used for the sample budget.
        """
        points_total = int(round((end - start) / step)) + 1
        points_per_chunk = self.points_per_chunk(series_hint)
        merged: dict[tuple, list[Series]] = {}
        for first in range(0, points_total, points_per_chunk):
            last = min(first + points_per_chunk, points_total) - 1
            params = {
                "query": query,
                "start": f"{start + first * step:.3f}",
                "end": f"{start + last * step:.3f}",
                "step": f"{step:g}",
            }
            for series in self._parse(self.get("/api/v1/query_range", params)):
                merged.setdefault(tuple(sorted(series.labels.items())), []).append(series)
        return [_concatenate(parts) for parts in merged.values()]

    def _parse(self, data: dict) -> list[Series]:
        """Parse a response's result, counting a malformed one as a failed query."""
        try:
            return _parse_result(data)
        except QueryError as error:
            self._on_error(error.reason)
            raise

    def points_per_chunk(self, series_count: int) -> int:
        by_samples = self.config.max_samples_per_query // max(series_count, 1)
        return max(1, min(self.config.max_points_per_query, by_samples))


def _decode(response: requests.Response, url: str) -> dict:
    status = response.status_code
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None

    if status >= 400:
        detail = body.get("error") if isinstance(body, dict) else response.text[:200]
        if status >= 500:
            raise QueryError("http_5xx", f"{url} returned HTTP {status}: {detail}", True)
        retryable = status in _RETRY_STATUSES or status not in _FINAL_STATUSES
        raise QueryError("http_4xx", f"{url} returned HTTP {status}: {detail}; check the query and range", retryable)

    if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(body.get("data"), dict):
        raise QueryError("bad_response", f"{url} returned a body that is not a Prometheus API success response: {response.text[:200]!r}", False)
    return body["data"]


def _parse_result(data: dict) -> list[Series]:
    kind = data.get("resultType")
    result = data.get("result")
    if not isinstance(result, list):
        raise QueryError("bad_response", f"response has no result list (resultType {kind!r})", False)
    if kind == "scalar":
        result = [{"metric": {}, "value": result}]
        kind = "vector"
    if kind not in ("matrix", "vector"):
        raise QueryError("bad_response", f"unsupported resultType {kind!r}; signals must return an instant vector", False)

    try:
        return _series_from_result(result, kind)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise QueryError("bad_response", f"malformed series in response: {error!r}", False) from None


def _series_from_result(result: list, kind: str) -> list[Series]:
    """Convert every series at once: two flat conversions instead of one per series.

    numpy parses Prometheus's value strings, "NaN" and "+Inf" included, in C; a per-series
    conversion costs several times more at thousands of series.
    """
    if kind == "matrix":
        samples = [item["values"] for item in result]
    else:
        samples = [[item["value"]] for item in result]
    lengths = np.array([len(pairs) for pairs in samples], dtype=np.int64)
    if any(len(pair) != 2 for pairs in samples for pair in pairs):
        raise ValueError("a sample is not a [timestamp, value] pair")
    timestamps = np.array([pair[0] for pairs in samples for pair in pairs], dtype=np.float64)
    values = np.array([pair[1] for pairs in samples for pair in pairs], dtype=np.float64)

    ends = np.cumsum(lengths)
    series = []
    for item, end, length in zip(result, ends.tolist(), lengths.tolist()):
        labels = item["metric"]
        if not isinstance(labels, dict):
            raise TypeError("metric is not a label mapping")
        series.append(Series(dict(labels), timestamps[end - length:end], values[end - length:end]))
    return series


def _concatenate(parts: list[Series]) -> Series:
    if len(parts) == 1:
        return parts[0]
    return Series(
        parts[0].labels,
        np.concatenate([p.timestamps for p in parts]),
        np.concatenate([p.values for p in parts]),
    )
