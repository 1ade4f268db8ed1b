"""Run-time counters, readable while mounted (`diofs stats MNT`, JSON).

Names are dotted and stable (`cache.hits`, `dio.bytes_written`, `locks.block_waits`).
The daemon is single-threaded trio code, so plain dict updates need no lock; worker
threads must not touch the counters.
"""

from __future__ import annotations

from collections import defaultdict

_counters: defaultdict[str, float] = defaultdict(int)


def add(name: str, n: float = 1) -> None:
    _counters[name] += n


def gauge(name: str, value: float) -> None:
    """Set `name` to `value` (a level, not a count: `add` counts)."""
    _counters[name] = value


def get(name: str) -> float:
    return _counters.get(name, 0)


def snapshot() -> dict[str, float]:
    return dict(sorted(_counters.items()))


def reset() -> None:
    _counters.clear()
