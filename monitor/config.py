"""Load and validate the service's YAML config into typed objects."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_ZERO_DURATION = re.compile(r"^0+(ms|s|m|h|d|w|y)?$")


class ConfigError(Exception):
    """Raised with every problem found in a config file, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def parse_duration(value: Any) -> float:
    """Parse a Prometheus duration such as `30s`, `1h30m` or `7d` into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m or 7d, found {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"expected a positive duration, found {value!r}")
        return float(value)
    text = str(value).strip()
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += int(match.group(1)) * _DURATION_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text) or not text or total <= 0:
        raise ValueError(f"expected a positive duration such as 30s, 5m or 7d, found {value!r}")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds as the shortest Prometheus duration that states them exactly."""
    if seconds != int(seconds):
        return f"{int(round(seconds * 1000))}ms"
    remaining = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if remaining >= size:
            parts.append(f"{remaining // size}{unit}")
            remaining %= size
    return "".join(parts) or "0s"


def parse_delay(value: Any) -> float:
    """Parse a duration that may also be zero (`0s`), such as score.lag."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and _ZERO_DURATION.match(value.strip()):
        return 0.0
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
# score.lag defaults to 0, so a config must be able to state 0s, and a dumped config must validate again.
Delay = Annotated[float, BeforeValidator(parse_delay)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BasicAuth(_Strict):
    username: str = Field(min_length=1)
    password_file: Path | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _one_password_source(self) -> BasicAuth:
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("set exactly one of password_file or password_env")
        return self


class PrometheusConfig(_Strict):
    url: str = "http://127.0.0.1:9090"
    timeout: Duration = 30.0
    bearer_token_file: Path | None = None
    bearer_token_env: str | None = None
    basic_auth: BasicAuth | None = None
    ca_file: Path | None = None
    tls_verify: bool = True
    headers: dict[str, str] = Field(default_factory=dict)
    max_points_per_query: int = Field(default=11000, ge=2, le=11000)
    max_samples_per_query: int = Field(default=5_000_000, ge=1000)
    accept_encoding: str = "identity"
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff: Duration = 0.5

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"expected an http:// or https:// URL, found {value!r}")
        return value.rstrip("/")

    @field_validator("bearer_token_file", "ca_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"file {str(value)!r} is missing or not readable")
        return value

    @model_validator(mode="after")
    def _one_auth_method(self) -> PrometheusConfig:
        token_sources = (self.bearer_token_file is not None) + (self.bearer_token_env is not None)
        if token_sources > 1:
            raise ValueError("set at most one of bearer_token_file or bearer_token_env")
        if token_sources and self.basic_auth is not None:
            raise ValueError("set either a bearer token or basic_auth, not both")
        return self


class StorageConfig(_Strict):
    path: Path = Path("/var/lib/anomaly-monitor")


def _shard_index(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"expected a non-negative integer or auto, found {value!r}")


class ShardConfig(_Strict):
    count: int = Field(default=1, ge=1, le=1024)
    index: Annotated[int | str, BeforeValidator(_shard_index)] = 0

    @model_validator(mode="after")
    def _index_in_range(self) -> ShardConfig:
        if isinstance(self.index, int) and not 0 <= self.index < self.count:
            raise ValueError(f"shard.index {self.index} must lie in [0, {self.count - 1}] for count {self.count}")
        return self


class TimeRange(_Strict):
    start: float
    end: float
    reason: str = ""

    @field_validator("start", "end", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> float:
        from monitor.timeutil import parse_time

        return parse_time(value)

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class ModelConfig(_Strict):
    hidden_size: int = Field(default=32, ge=2, le=1024)
    latent_size: int = Field(default=16, ge=1, le=1024)
    layers: int = Field(default=1, ge=1, le=4)
    calendar: bool = False


class TrainConfig(_Strict):
    range: Duration = 7 * 86400.0
    every: Duration = 6 * 3600.0
    warmup_retry: Duration = 600.0
    min_windows: int = Field(default=64, ge=8)
    max_windows: int = Field(default=20000, ge=64)
    max_entities: int = Field(default=500, ge=1)
    epochs: int = Field(default=30, ge=1, le=1000)
    warm_start_epochs: int = Field(default=5, ge=1, le=1000)
    patience: int = Field(default=3, ge=1)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    holdout_fraction: float = Field(default=0.4, gt=0, lt=0.5)
    max_error_increase: float = Field(default=1.5, gt=1)
    max_condition_number: float = Field(default=1e10, gt=1)
    warm_start: bool = True
    seed: int = 0
    exclude: list[TimeRange] = Field(default_factory=list)


class ScoreConfig(_Strict):
    every: Duration = 60.0
    aggregate_steps: int = Field(default=10, ge=1)
    max_missing_fraction: float = Field(default=0.2, ge=0, lt=1)
    fill_gaps: int = Field(default=2, ge=0, le=10)
    entity_ttl: Duration = 900.0
    top_contributions: int = Field(default=20, ge=0)
    lag: Delay = 0.0


class ThresholdConfig(_Strict):
    method: Literal["chi2", "quantile", "evt"] = "evt"
    false_alarm_rate: float = Field(default=0.001, gt=0, lt=0.5)


class DetectorConfig(_Strict):
    name: str
    entity_labels: list[str] = Field(min_length=1)
    step: Duration = 30.0
    window: int = Field(default=30, ge=2, le=10000)
    signals: dict[str, str] = Field(min_length=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9_-]{0,62}$", value):
            raise ValueError(f"expected lower-case letters, digits, '-' or '_' (at most 63), found {value!r}")
        return value

    @field_validator("entity_labels")
    @classmethod
    def _valid_labels(cls, value: list[str]) -> list[str]:
        for label in value:
            if not _NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{label!r} is not a valid Prometheus label name")
            if label in ("detector", "entity", "signal", "le"):
                raise ValueError(f"{label!r} is reserved for the exported metrics; rename it in the query")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate label in {value}")
        return value

    @field_validator("signals")
    @classmethod
    def _valid_signals(cls, value: dict[str, str]) -> dict[str, str]:
        for name, query in value.items():
            if not _NAME.match(name):
                raise ValueError(f"signal name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]*")
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"signal {name!r} needs a non-empty PromQL expression")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DetectorConfig:
        if self.score.aggregate_steps > self.window:
            raise ValueError(f"score.aggregate_steps ({self.score.aggregate_steps}) must not exceed window ({self.window})")
        if self.score.every < self.step:
            raise ValueError(f"score.every ({format_duration(self.score.every)}) must be at least step ({format_duration(self.step)})")
        if self.train.range < 4 * self.window * self.step:
            raise ValueError(f"train.range ({format_duration(self.train.range)}) must cover at least 4 windows ({format_duration(4 * self.window * self.step)})")
        return self


class Config(_Strict):
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    listen: str = "0.0.0.0:9464"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    torch_threads: int = Field(default=1, ge=1, le=256)
    detectors: list[DetectorConfig] = Field(min_length=1)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT such as 0.0.0.0:9464, found {value!r}")
        return value

    @field_validator("detectors")
    @classmethod
    def _unique_detectors(cls, detectors: list[DetectorConfig]) -> list[DetectorConfig]:
        names = [d.name for d in detectors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"detector names must be unique, found {duplicates} more than once")
        return detectors

    def detector(self, name: str) -> DetectorConfig:
        for detector in self.detectors:
            if detector.name == name:
                return detector
        raise KeyError(f"no detector named {name!r}; configured: {[d.name for d in self.detectors]}")


def _location(error: dict) -> str:
    parts = []
    for item in error["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _describe(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    where = _location(error)
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    found = error.get("input")
    # A mapping is the input of a cross-field check, whose message already names the values.
    if isinstance(found, dict) or "found" in message:
        return f"{where}: {message}"
    found_text = repr(found)
    if len(found_text) > 80:
        found_text = found_text[:77] + "..."
    return f"{where}: {message} (found {found_text})"


def _apply_shard_environment(raw: dict) -> dict:
    shard = dict(raw.get("shard") or {})
    for key in ("count", "index"):
        value = os.environ.get(f"ANOMALY_MONITOR_SHARD_{key.upper()}")
        if value:
            shard[key] = value
    if shard:
        raw = {**raw, "shard": shard}
    return raw


def parse_config(raw: Any, source: str = "<config>") -> Config:
    """Validate a decoded YAML document; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of keys, found {type(raw).__name__}"])
    raw = _apply_shard_environment(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(source, [_describe(e) for e in error.errors()]) from None


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a config file; raise ConfigError on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(source, [f"cannot read the file: {error.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(source, [f"invalid YAML: {error}"]) from None
    return parse_config(raw, source)
