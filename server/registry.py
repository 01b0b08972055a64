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

The run state of a plan (progress, round and best-round checkpoints) is kept by
:class:`server.registry_runs.RunState`, its metrics log and results by
:class:`server.registry_metrics.RunRecords`; :class:`Registry` has both and commits and
loads the versions.

Plan names and version ids become paths, so both are checked before use: plans with the
shared name rule (:mod:`unicon_model.names`), versions with :data:`VERSION_PATTERN`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from server.errors import RegistryError
from server.registry_metrics import MetricsLog, RunRecords
from server.registry_runs import (
    CompletedStage,
    RunProgress,
    StageInProgress,
    write_json_atomic,
)
from unicon_model.checkpoint import (
    CheckpointManifest,
    Lineage,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from unicon_model.components import split_by_component
from unicon_model.durable import file_lock
from unicon_model.errors import CheckpointError
from unicon_model.model import UniconModel
from unicon_model.names import check_name, path_under
from unicon_model.schema import DataSpec

__all__ = [
    "LAST_VERSION_NAME",
    "LOCK_NAME",
    "LOCK_TIMEOUT_S",
    "VERSION_PATTERN",
    "VERSION_RULE",
    "CompletedStage",
    "MetricsLog",
    "Registry",
    "RunProgress",
    "StageInProgress",
    "check_version",
]

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


class Registry(RunRecords):
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
            write_json_atomic(self.versions_dir / LAST_VERSION_NAME, number)
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
