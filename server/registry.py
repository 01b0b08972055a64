"""The coordinator's model registry: versions, the stage in progress, metrics, resume.

Layout of a registry directory::

    versions/v0001-foundation/     one checkpoint per committed stage (unicon_model.checkpoint)
    runs/<plan>/progress.json      completed stages (with their versions), stage in progress
    runs/<plan>/round/             global model after the last completed round of that stage
    runs/<plan>/best-<round>/      the stage's best-validated round so far (keep_best)
    runs/<plan>/metrics.jsonl      one line per round and per evaluation
    runs/<plan>/results.json       R[stage, task] per site and pooled, bytes, ε

Every write is atomic (temporary file or directory, then rename; a metrics line is one
``write`` and an ``fsync``), so a crash of the coordinator loses at most the round in flight;
launching the same plan again resumes from ``progress.json``.

Commits take an exclusive lock (``fcntl.flock`` on ``.registry.lock`` in the registry root),
number the new version after the highest number ever used (``versions/.last-version`` keeps
it when versions are deleted) and create its folder exclusively, so two coordinators
committing at once get distinct versions and no commit replaces another version.

Plan names and version ids become paths, so both are checked before use: plans with the
shared name rule (:mod:`unicon_model.names`), versions with :data:`VERSION_PATTERN`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import RegistryError
from unicon_model.checkpoint import (
    CheckpointManifest,
    Lineage,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from unicon_model.components import split_by_component
from unicon_model.durable import atomic_write, file_lock, fsync_directory
from unicon_model.errors import CheckpointError
from unicon_model.model import UniconModel
from unicon_model.names import check_name, path_under
from unicon_model.schema import DataSpec

logger = logging.getLogger(__name__)

VERSION_PATTERN = r"^v\d{4,}(-[a-z0-9][a-z0-9_-]{0,63})?$"
"""Version ids: ``v``, at least four digits, then ``-<stage>`` (``v0002-prognosis``)."""

VERSION_RULE = "'v', at least four digits and '-<stage>', e.g. v0002-prognosis"
"""The version rule in words, for error messages."""

LOCK_NAME = ".registry.lock"
"""Lock file in the registry root, held (``flock``) while a version is committed."""

LAST_VERSION_NAME = ".last-version"
"""File in ``versions/`` with the highest version number ever committed."""

LOCK_TIMEOUT_S = 120.0
"""How long a commit waits for another process's commit before giving up."""

_VERSION_RE = re.compile(r"v(\d{4,})(?:-[a-z0-9][a-z0-9_-]{0,63})?")
_NUMBER_RE = re.compile(r"v(\d{4,})(?:-|$)")


def check_version(version: object) -> str:
    """Return ``version`` if it is a well-formed version id (:data:`VERSION_PATTERN`).

    Raises
    ------
    RegistryError
        Naming the offending value and the rule.
    """
    if not isinstance(version, str) or _VERSION_RE.fullmatch(version) is None:
        raise RegistryError(f"version {version!r} is not a valid version id: use {VERSION_RULE}")
    return version


def _version_number(name: str) -> int | None:
    match = _NUMBER_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass
class MetricsLog:
    """The records of a ``metrics.jsonl`` and the warnings met while reading it."""

    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class CompletedStage(BaseModel):
    """A stage that finished and the version it committed."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    version: str


class StageInProgress(BaseModel):
    """The stage being trained and its last completed round."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    round: int = 0


class RunProgress(BaseModel):
    """What of a plan has been done (``progress.json``)."""

    model_config = ConfigDict(extra="forbid")
    plan: str
    plan_digest: str = ""
    completed: list[CompletedStage] = Field(default_factory=list)
    current: StageInProgress | None = None

    @property
    def completed_stages(self) -> list[str]:
        """Names of the completed stages, in order."""
        return [c.stage for c in self.completed]


def _write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` by ``data`` as JSON: temporary sibling, fsync, rename, fsync folder.

    The data is serialised before anything is written, and the temporary file is removed on
    any failure, so the old file stays intact unless the new one is complete.
    """
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, prefix=f".{path.name}-")


def _drop_torn_tail(fd: int, path: Path) -> None:
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


def _staged_round(
    staging: Path, stage: str, round_: int, model: UniconModel, lineage: Lineage
) -> Path:
    """Write ``model`` as the checkpoint of ``stage`` round ``round_`` into a fresh ``staging``."""
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(
        staging,
        split_by_component(model.state_dict()),
        version=f"{stage}-round-{round_}",
        model_config=model.config(),
        lineage=lineage,
    )
    return staging


class Registry:
    """A directory of model versions and run state.

    Parameters
    ----------
    root
        The registry directory (created if missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.runs_dir = self.root / "runs"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the registry's exclusive lock (``flock`` on :data:`LOCK_NAME`).

        The lock belongs to the open file, so it excludes other processes and other threads
        alike, and the kernel releases it if the holder dies.

        Raises
        ------
        RegistryError
            If another holder keeps it for more than ``timeout_s`` seconds.
        """
        path = self.root / LOCK_NAME
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(file_lock(path, mode=0o644, timeout_s=timeout_s))
            except TimeoutError:
                raise RegistryError(
                    f"{path} is still locked after {timeout_s:g} s: another process "
                    "is committing to this registry; wait for it to finish or stop it"
                ) from None
            yield

    # ------------------------------------------------------------------ versions
    def version_dir(self, version: str) -> Path:
        """The folder of ``version``, checked to be a version id inside ``versions/``.

        Raises
        ------
        RegistryError
            If ``version`` is not a valid version id (it would never become a path).
        """
        try:
            check_version(version)
        except RegistryError as e:
            raise RegistryError(f"{e}; versions: {self.versions()}") from None
        return path_under(self.versions_dir, version)

    def versions(self) -> list[str]:
        """Committed version ids, oldest first (folders with a manifest and a valid id)."""
        found = [
            p.name
            for p in self.versions_dir.iterdir()
            if _VERSION_RE.fullmatch(p.name) and (p / "manifest.json").exists()
        ]
        return sorted(found, key=lambda name: (_version_number(name) or 0, name))

    def _unknown(self, version: str) -> RegistryError:
        return RegistryError(f"no version {version!r}; versions: {self.versions()}")

    def manifest(self, version: str) -> CheckpointManifest:
        """The manifest of a version.

        Raises
        ------
        RegistryError
            If ``version`` is malformed or unknown (listing the versions), or its
            ``manifest.json`` is unreadable (naming the file and what to do).
        """
        path = self.version_dir(version)
        if not (path / "manifest.json").exists():
            raise self._unknown(version)
        try:
            return read_manifest(path)
        except CheckpointError as e:
            raise RegistryError(f"{e}\n{self._repair_hint(path)}") from e

    def _repair_hint(self, path: Path) -> str:
        return (
            f"version folder {path} is damaged: restore it from a backup, or move it out of "
            f"{self.versions_dir} to hide that version"
        )

    def _last_number(self) -> int:
        """The highest version number used so far (folders present or recorded)."""
        numbers = [n for p in self.versions_dir.iterdir() if (n := _version_number(p.name))]
        marker = self.versions_dir / LAST_VERSION_NAME
        if marker.exists():
            try:
                numbers.append(int(marker.read_text().strip()))
            except (OSError, ValueError) as e:
                logger.warning("%s is unreadable (%s); numbering from the folders", marker, e)
        return max(numbers, default=0)

    def commit(self, model: UniconModel, *, lineage: Lineage, data: DataSpec | None = None) -> str:
        """Store ``model`` as a new version; return its id (``v0001-<stage>``).

        ``data`` (the plan's patch size and spacing) is kept in the model config so that an
        exported version preprocesses images exactly as training did. Concurrent commits
        (threads or processes) are serialised by :meth:`lock`; the new number follows the
        highest one ever used, and its folder is created exclusively, so no commit replaces
        or reuses another version, even after versions were deleted.

        Raises
        ------
        UnsafeNameError
            If the lineage's stage name breaks the name rule.
        """
        stage = check_name(lineage.stage or "model", "stage")
        config = model.config()
        if data is not None:
            config["data"] = data.model_dump(mode="json")
        components = split_by_component(model.state_dict())
        with self.lock():
            number = self._last_number() + 1
            while True:
                version = f"v{number:04d}-{stage}"
                target = self.versions_dir / version
                try:
                    os.mkdir(target)  # exclusive: never an existing version
                except FileExistsError:
                    number += 1
                    continue
                break
            _write_json_atomic(self.versions_dir / LAST_VERSION_NAME, number)
            try:
                save_checkpoint(
                    target, components, version=version, model_config=config, lineage=lineage
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    target.rmdir()  # only the empty reservation; never a written version
                raise
        logger.info("registry %s: committed %s", self.root, version)
        return version

    def load(self, version: str) -> tuple[UniconModel, CheckpointManifest]:
        """Rebuild the model of a version, its tensors verified against their hashes.

        Raises
        ------
        RegistryError
            If the version is malformed, unknown or damaged (naming the file).
        """
        path = self.version_dir(version)
        if not (path / "manifest.json").exists():
            raise self._unknown(version)
        try:
            manifest, components = load_checkpoint(path)
        except CheckpointError as e:
            raise RegistryError(f"{e}\n{self._repair_hint(path)}") from e
        model = UniconModel.from_config(dict(manifest.model_config_))
        model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
        return model, manifest

    # ------------------------------------------------------------------ runs
    def plans(self) -> list[str]:
        """Names of the plans with run state, sorted (folders breaking the name rule skipped)."""
        found = []
        for path in self.runs_dir.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                found.append(check_name(path.name, "plan"))
            except ValueError:
                logger.warning("%s: not a valid plan name; ignored", path)
        return sorted(found)

    def run_dir(self, plan: str) -> Path:
        """State directory of the runs of plan ``plan``.

        Raises
        ------
        UnsafeNameError
            If ``plan`` breaks the name rule (it would never become a path).
        """
        return path_under(self.runs_dir, check_name(plan, "plan"))

    def progress(self, plan: str) -> RunProgress:
        """Progress of a plan (empty if it never ran).

        Raises
        ------
        RegistryError
            If ``progress.json`` is unreadable or not the progress of ``plan``, naming the file
            and what to do.
        """
        path = self.run_dir(plan) / "progress.json"
        if not path.exists():
            return RunProgress(plan=plan)
        fix = (
            f"restore {path} from a backup; deleting it makes the next launch of plan "
            f"{plan!r} start again from its first stage"
        )
        try:
            progress = RunProgress.model_validate(json.loads(path.read_bytes()))
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}"
                for err in e.errors()
            )
            raise RegistryError(f"{path} is corrupt: {problems}\n{fix}") from e
        except (OSError, ValueError) as e:
            raise RegistryError(f"{path} is corrupt: {e}\n{fix}") from e
        if progress.plan != plan:
            raise RegistryError(
                f"{path} is the progress of plan {progress.plan!r}, not {plan!r}\n{fix}"
            )
        return progress

    def save_progress(self, progress: RunProgress) -> None:
        """Write ``progress.json`` atomically."""
        _write_json_atomic(
            self.run_dir(progress.plan) / "progress.json", progress.model_dump(mode="json")
        )

    def save_round(
        self, plan: str, stage: str, round_: int, model: UniconModel, lineage: Lineage
    ) -> None:
        """Checkpoint the global model after a completed round, then advance the progress."""
        run = self.run_dir(plan)
        target = run / "round"
        staging = _staged_round(run / f".round-{round_}", stage, round_, model, lineage)
        old = run / ".round-old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        progress = self.progress(plan)
        progress.current = StageInProgress(stage=stage, round=round_)
        self.save_progress(progress)

    def load_round(self, plan: str) -> tuple[UniconModel, CheckpointManifest] | None:
        """The checkpoint of the stage in progress, if any.

        If a crash fell between the two renames of :meth:`save_round`, only ``.round-old``
        (the round ``progress.json`` still names) is left; it is used.

        Raises
        ------
        RegistryError
            If the checkpoint is damaged, naming it and what to do.
        """
        run = self.run_dir(plan)
        target = run / "round"
        if not (target / "manifest.json").exists():
            target = run / ".round-old"
            if not (target / "manifest.json").exists():
                return None
            logger.warning("%s: resuming from %s (a crash interrupted a round save)", run, target)
        try:
            manifest, components = load_checkpoint(target)
        except CheckpointError as e:
            raise RegistryError(
                f"{e}\nthe round checkpoint {target} is damaged: delete it to restart the "
                "stage in progress from its first round"
            ) from e
        model = UniconModel.from_config(dict(manifest.model_config_))
        model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
        return model, manifest

    def complete_stage(self, plan: str, stage: str, version: str) -> None:
        """Mark ``stage`` done with its committed version; drop its round checkpoints."""
        progress = self.progress(plan)
        progress.completed.append(CompletedStage(stage=stage, version=version))
        progress.current = None
        self.save_progress(progress)
        shutil.rmtree(self.run_dir(plan) / "round", ignore_errors=True)
        self.prune_best(plan, keep=None)

    def save_best(
        self, plan: str, stage: str, round_: int, model: UniconModel, lineage: Lineage
    ) -> None:
        """Keep the model of ``round_``, the stage's best-validated round so far.

        Written as ``runs/<plan>/best-<round>/`` (staged, then renamed) *before* the round's
        own checkpoint, whose lineage names the best round: a crash between the two leaves
        the previous best in place for the resumed stage. :meth:`prune_best` drops the others.
        """
        run = self.run_dir(plan)
        staging = _staged_round(run / f".best-{round_}", stage, round_, model, lineage)
        target = run / f"best-{round_}"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)

    def load_best(self, plan: str, stage: str, round_: int) -> UniconModel | None:
        """The kept model of ``round_`` of ``stage`` (see :meth:`save_best`), if present.

        Raises
        ------
        RegistryError
            If the checkpoint is damaged, naming it and what to do.
        """
        target = self.run_dir(plan) / f"best-{int(round_)}"
        if not (target / "manifest.json").exists():
            return None
        try:
            manifest, components = load_checkpoint(target)
        except CheckpointError as e:
            raise RegistryError(
                f"{e}\nthe best-round checkpoint {target} is damaged: delete it (the stage then "
                "keeps its best round among those run after the resume)"
            ) from e
        if manifest.version != f"{stage}-round-{int(round_)}":
            return None
        model = UniconModel.from_config(dict(manifest.model_config_))
        model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
        return model

    def prune_best(self, plan: str, keep: int | None) -> None:
        """Delete every best-round checkpoint of ``plan`` but ``best-<keep>``."""
        run = self.run_dir(plan)
        if not run.is_dir():
            return
        for path in run.iterdir():
            if path.name.startswith(("best-", ".best-")) and path.name != f"best-{keep}":
                shutil.rmtree(path, ignore_errors=True)

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
                _drop_torn_tail(fd, path)
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
        _write_json_atomic(self.run_dir(plan) / "results.json", results)

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
