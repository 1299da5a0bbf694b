"""Parse the time arguments that the CLI and the config accept."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any


def parse_time(value: Any, now: float | None = None) -> float:
    """Parse RFC 3339, Unix seconds, `now` or `now-<duration>` into Unix seconds (UTC)."""
    from monitor.config import parse_duration

    if isinstance(value, datetime):
        return _aware(value).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)

    text = str(value).strip()
    current = time.time() if now is None else now
    if text == "now":
        return current
    if text.startswith("now-"):
        return current - parse_duration(text[4:])
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return _aware(datetime.fromisoformat(text.replace("Z", "+00:00"))).timestamp()
    except ValueError:
        raise ValueError(
            f"invalid time {value!r}: use RFC 3339 (2026-01-31T12:00:00Z), Unix seconds, now or now-6h"
        ) from None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def isoformat(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")
