"""Split a detector's entities across replicas by a stable hash of their label values."""

from __future__ import annotations

import hashlib
import logging
import os
import re

from monitor.config import ShardConfig

logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """The shard index cannot be determined."""


def shard_of(entity: tuple[str, ...], count: int) -> int:
    """Return the shard of an entity: the same on every replica, process and Python version."""
    if count == 1:
        return 0
    # Unlike hash(), SHA-256 is not salted per process, so every replica agrees.
    digest = hashlib.sha256("\x00".join(entity).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def resolve_index(shard: ShardConfig, hostname: str | None = None) -> int:
    """Return the configured index, or for `auto` the ordinal at the end of the host name (pod-3 -> 3)."""
    if isinstance(shard.index, int):
        return shard.index
    name = hostname if hostname is not None else os.environ.get("HOSTNAME", "")
    match = re.search(r"-(\d+)$", name)
    if not match:
        raise ShardError(
            f"shard.index is auto but host name {name!r} does not end in -<ordinal>; "
            "run as a StatefulSet pod or set shard.index or ANOMALY_MONITOR_SHARD_INDEX")
    index = int(match.group(1))
    if index >= shard.count:
        raise ShardError(f"shard index {index} from host name {name!r} is not below shard.count {shard.count}")
    return index


class Shard:
    def __init__(self, index: int, count: int):
        self.index = index
        self.count = count

    def owns(self, entity: tuple[str, ...]) -> bool:
        return shard_of(entity, self.count) == self.index
