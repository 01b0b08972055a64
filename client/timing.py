"""Where a site's time goes while it serves one request (reply metrics ``time/<phase>_s``).

A request is served inside :func:`recording`; code along the way wraps each phase in
:func:`phase` (data loading, model assembly, training, evaluation, DP accounting, state
persistence, (de)serialising, SecAgg+). The phases of the request are added to the reply's
metrics by :func:`metrics`, next to counters such as the preprocessing cache's hits and
misses (``count/<name>``). The coordinator collects them into each round record's
``timing`` (see :mod:`server.timing`). Outside :func:`recording` the helpers do nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

TIME_PREFIX = "time/"
"""Reply metric prefix of a phase's seconds: ``time/<phase>_s``."""
COUNT_PREFIX = "count/"
"""Reply metric prefix of a counter: ``count/<name>``."""


@dataclass
class Recording:
    """The phases (seconds) and counters of the request being served."""

    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def count(self, name: str, value: float) -> None:
        """Add ``value`` to counter ``name``."""
        self.counts[name] = self.counts.get(name, 0.0) + value


_CURRENT: ContextVar[Recording | None] = ContextVar("unicon_site_timing", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """Record the phases of one request; re-entrant (an inner call joins the outer one)."""
    current = _CURRENT.get()
    if current is not None:
        yield current
        return
    fresh = Recording()
    token = _CURRENT.set(fresh)
    try:
        yield fresh
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the time spent in the ``with`` block to phase ``name`` of the current request."""
    started = time.perf_counter()
    try:
        yield
    finally:
        current = _CURRENT.get()
        if current is not None:
            current.add(name, time.perf_counter() - started)


def count(name: str, value: float) -> None:
    """Add ``value`` to counter ``name`` of the current request (nothing outside one)."""
    current = _CURRENT.get()
    if current is not None:
        current.count(name, value)


def metrics(record: Recording) -> dict[str, float]:
    """``record`` as reply metrics: ``time/<phase>_s`` and ``count/<name>``."""
    out = {f"{TIME_PREFIX}{k}_s": float(v) for k, v in record.seconds.items()}
    out.update({f"{COUNT_PREFIX}{k}": float(v) for k, v in record.counts.items()})
    return out


def without_timing(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` without timing metrics (a stored reply keeps none: they describe one serving)."""
    return {k: v for k, v in values.items() if not k.startswith((TIME_PREFIX, COUNT_PREFIX))}
