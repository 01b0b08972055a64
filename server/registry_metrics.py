"""A plan's records in the registry: the metrics log and the results table.

Layout under the registry root::

    runs/<plan>/metrics.jsonl      one line per round and per evaluation
    runs/<plan>/results.json       R[stage, task] per site and pooled, bytes, ε

A metrics line is one ``write`` and an ``fsync`` (a torn last line left by a crash is cut off
before the next append); ``results.json`` is replaced atomically. :class:`RunRecords` holds
the methods; :class:`server.registry.Registry` has them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import RegistryError
from server.registry_runs import RunState, write_json_atomic
from unicon_model.durable import file_lock, fsync_directory

logger = logging.getLogger(__name__)


@dataclass
class MetricsLog:
    """The records of a ``metrics.jsonl`` and the warnings met while reading it."""

    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def drop_torn_tail(fd: int, path: Path) -> None:
    """Cut an unterminated last line (a write torn by a crash) off an append-only log.

    A last line that is a whole JSON object and lacks only its newline is kept and
    terminated instead, as :meth:`Registry.read_metrics` reads it.
    """
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    tail = os.pread(fd, size - keep, keep)
    try:
        complete = isinstance(json.loads(tail), dict)
    except ValueError:
        complete = False
    if complete:  # the record is whole, only its newline is missing
        os.write(fd, b"\n")
        return
    logger.warning(
        "%s: dropping a torn last line (%d bytes, never completed): %r",
        path,
        size - keep,
        tail[:200],
    )
    os.ftruncate(fd, keep)


class RunRecords(RunState):
    """The metrics and results methods of :class:`server.registry.Registry`."""

    def append_metrics(self, plan: str, record: dict[str, Any]) -> None:
        """Append one JSON line to the run's metrics log: one ``write``, then ``fsync``.

        A torn last line left by a crash is cut off first (it was never a complete record),
        so the new line never glues onto it. Appenders are serialised with ``flock``.
        """
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        path = self.run_dir(plan) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            with file_lock(fd):
                drop_torn_tail(fd, path)
                written = os.write(fd, line)
                if written != len(line):  # a regular file takes it all unless the disk is full
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    raise RegistryError(f"{path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(path.parent)

    def read_metrics(self, plan: str) -> MetricsLog:
        """Every metrics record of a plan's runs, with warnings for the caller to show.

        A torn last line (no final newline: a write cut by a crash) is skipped with a warning.

        Raises
        ------
        RegistryError
            If any complete line is not a JSON object, naming the file and the line number.
        """
        path = self.run_dir(plan) / "metrics.jsonl"
        log = MetricsLog()
        if not path.exists():
            return log
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RegistryError(f"cannot read {path}: {e}") from e
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:
                record, error = None, str(e)
            else:
                error = "not a JSON object"
            if not isinstance(record, dict):
                raise RegistryError(
                    f"{path} line {number} is corrupt ({error}): fix or delete that line "
                    "(each line is one independent record)"
                )
            log.records.append(record)
        if torn.strip():
            message = (
                f"{path} line {len(lines) + 1} is incomplete (a write cut off by a crash); "
                "skipped it: it is dropped at the next append"
            )
            try:
                record = json.loads(torn)
            except ValueError:
                record = None
            if isinstance(record, dict):  # complete but for the newline: keep it
                log.records.append(record)
            else:
                log.warnings.append(message)
        return log

    def metrics(self, plan: str) -> list[dict[str, Any]]:
        """Every metrics record of a plan's runs (see :meth:`read_metrics`; warnings logged)."""
        log = self.read_metrics(plan)
        for warning in log.warnings:
            logger.warning("%s", warning)
        return log.records

    def save_results(self, plan: str, results: dict[str, Any]) -> None:
        """Write the run's ``results.json`` atomically."""
        write_json_atomic(self.run_dir(plan) / "results.json", results)

    def results(self, plan: str) -> dict[str, Any]:
        """The run's ``results.json`` (empty if none yet).

        Raises
        ------
        RegistryError
            If the file is unreadable or not a JSON object, naming it.
        """
        path = self.run_dir(plan) / "results.json"
        if not path.exists():
            return {}
        try:
            results = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise RegistryError(
                f"{path} is corrupt: {e}\nrestore it from a backup (it is rebuilt only by "
                "evaluating every stage again)"
            ) from e
        if not isinstance(results, dict):
            raise RegistryError(f"{path} is not a JSON object; restore it from a backup")
        return results
