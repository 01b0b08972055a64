"""Where the coordinator's time goes in a round, and where each site's went.

:class:`PhaseClock` measures the coordinator's phases *exclusively*: a phase entered inside
another one pauses the outer phase, so the phases of a round add up to its wall time (what
is left over is reported as ``unaccounted_s``). The sites' own phases arrive as reply
metrics ``time/<phase>_s`` and ``count/<name>`` (see :mod:`client.timing`) and are summed per
site over the round's messages (training and validation).

Coordinator phases of a round: ``request`` (splitting and hashing the global model into
components for the request), ``train_wait`` (waiting for the train replies, or for the whole
SecAgg+ exchange), ``update_check`` (reply and update validation), ``aggregation`` (merging
and loading the updates), ``evaluate_wait`` and ``validation`` (the ``val`` evaluation's wait
and the rest of it, keep-best included), ``checkpoint`` (round checkpoint in the registry).
Stage phases: ``selection`` (query and eligibility, starting model), ``evaluation`` (the test
evaluation after the last round) and ``commit`` (version and results in the registry).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

TIME_PREFIX = "time/"
"""Reply metric prefix of a site's phase seconds (``time/<phase>_s``)."""
COUNT_PREFIX = "count/"
"""Reply metric prefix of a site's counters (``count/<name>``)."""


class PhaseClock:
    """Exclusive phase timing of the coordinator plus the sites' reported phases."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.sites: dict[str, dict[str, float]] = {}
        self.counts: dict[str, dict[str, float]] = {}
        self._stack: list[list[Any]] = []  # [name, time the phase last resumed]

    def reset(self) -> None:
        """Forget everything measured so far (start of a round or stage)."""
        self.seconds, self.sites, self.counts = {}, {}, {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the ``with`` block's time to ``name``, minus the phases nested inside it."""
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self._add(outer[0], now - outer[1])
        frame: list[Any] = [name, now]
        self._stack.append(frame)
        try:
            yield
        finally:
            end = time.perf_counter()
            self._stack.pop()
            self._add(name, end - frame[1])
            if self._stack:
                self._stack[-1][1] = end

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def add_site(self, site: str, metrics: Mapping[str, Any]) -> None:
        """Add a reply's ``time/<phase>_s`` and ``count/<name>`` metrics to ``site``'s sums.

        Values that are not finite numbers >= 0 are ignored (a site's report is untrusted
        and only informative).
        """
        for key, raw in metrics.items():
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                continue
            value = float(raw)
            if not math.isfinite(value) or value < 0:
                continue
            if key.startswith(TIME_PREFIX) and key.endswith("_s"):
                phase = key[len(TIME_PREFIX) : -2]
                row = self.sites.setdefault(site, {})
                row[phase] = row.get(phase, 0.0) + value
            elif key.startswith(COUNT_PREFIX):
                row = self.counts.setdefault(site, {})
                name = key[len(COUNT_PREFIX) :]
                row[name] = row.get(name, 0.0) + value

    def summary(self, wall_s: float) -> dict[str, Any]:
        """The breakdown of ``wall_s``: coordinator phases, each site's phases and counts.

        ``unaccounted_s`` is the wall time no coordinator phase covers (it may be slightly
        negative from rounding); ``sites_s`` each site's total of its phases.
        """
        coordinator = {f"{k}_s": v for k, v in sorted(self.seconds.items())}
        return {
            "wall_s": wall_s,
            "coordinator": coordinator,
            "unaccounted_s": wall_s - sum(coordinator.values()),
            "sites": {
                s: {f"{k}_s": v for k, v in sorted(p.items())} for s, p in self.sites.items()
            },
            "sites_s": {s: sum(p.values()) for s, p in self.sites.items()},
            "counts": {s: dict(sorted(c.items())) for s, c in self.counts.items()},
        }
