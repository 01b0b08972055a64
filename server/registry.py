"""The coordinator's model registry: versions, the stage in progress, metrics, resume.

Layout of a registry directory::

    versions/v0001-foundation/     one checkpoint per committed stage (unicon_model.checkpoint)
    runs/<plan>/progress.json      completed stages (with their versions), stage in progress
    runs/<plan>/round/             global model after the last completed round of that stage
    runs/<plan>/metrics.jsonl      one line per round and per evaluation
    runs/<plan>/results.json       R[stage, task] per site and pooled, bytes, ε

Every write is atomic (temporary file or directory, then rename), so a crash of the
coordinator loses at most the round in flight; launching the same plan again resumes from
``progress.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.errors import RegistryError
from unicon_model.checkpoint import (
    CheckpointManifest,
    Lineage,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from unicon_model.components import split_by_component
from unicon_model.model import UniconModel
from unicon_model.schema import DataSpec

logger = logging.getLogger(__name__)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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

    # ------------------------------------------------------------------ versions
    def versions(self) -> list[str]:
        """Committed version ids, oldest first."""
        return sorted(p.name for p in self.versions_dir.iterdir() if (p / "manifest.json").exists())

    def manifest(self, version: str) -> CheckpointManifest:
        """The manifest of a version (``RegistryError`` listing the versions if unknown)."""
        path = self.versions_dir / version
        if not (path / "manifest.json").exists():
            raise RegistryError(f"no version {version!r}; versions: {self.versions()}")
        return read_manifest(path)

    def commit(self, model: UniconModel, *, lineage: Lineage, data: DataSpec | None = None) -> str:
        """Store ``model`` as a new version; return its id (``v0001-<stage>``).

        ``data`` (the plan's patch size and spacing) is kept in the model config so that an
        exported version preprocesses images exactly as training did.
        """
        number = len(self.versions()) + 1
        version = f"v{number:04d}-{lineage.stage or 'model'}"
        config = model.config()
        if data is not None:
            config["data"] = data.model_dump(mode="json")
        save_checkpoint(
            self.versions_dir / version,
            split_by_component(model.state_dict()),
            version=version,
            model_config=config,
            lineage=lineage,
        )
        logger.info("registry %s: committed %s", self.root, version)
        return version

    def load(self, version: str) -> tuple[UniconModel, CheckpointManifest]:
        """Rebuild the model of a version, its tensors verified against their hashes."""
        path = self.versions_dir / version
        if not path.exists():
            raise RegistryError(f"no version {version!r}; versions: {self.versions()}")
        manifest, components = load_checkpoint(path)
        model = UniconModel.from_config(dict(manifest.model_config_))
        model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
        return model, manifest

    # ------------------------------------------------------------------ runs
    def run_dir(self, plan: str) -> Path:
        """State directory of the runs of plan ``plan``."""
        return self.runs_dir / plan

    def progress(self, plan: str) -> RunProgress:
        """Progress of a plan (empty if it never ran)."""
        path = self.run_dir(plan) / "progress.json"
        if not path.exists():
            return RunProgress(plan=plan)
        try:
            return RunProgress.model_validate_json(path.read_text())
        except ValueError as e:
            raise RegistryError(f"{path} is corrupt: {e}") from e

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
        staging = run / f".round-{round_}"
        shutil.rmtree(staging, ignore_errors=True)
        save_checkpoint(
            staging,
            split_by_component(model.state_dict()),
            version=f"{stage}-round-{round_}",
            model_config=model.config(),
            lineage=lineage,
        )
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
        """The checkpoint of the stage in progress, if any."""
        target = self.run_dir(plan) / "round"
        if not (target / "manifest.json").exists():
            return None
        manifest, components = load_checkpoint(target)
        model = UniconModel.from_config(dict(manifest.model_config_))
        model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
        return model, manifest

    def complete_stage(self, plan: str, stage: str, version: str) -> None:
        """Mark ``stage`` done with its committed version; drop its round checkpoint."""
        progress = self.progress(plan)
        progress.completed.append(CompletedStage(stage=stage, version=version))
        progress.current = None
        self.save_progress(progress)
        shutil.rmtree(self.run_dir(plan) / "round", ignore_errors=True)

    def append_metrics(self, plan: str, record: dict[str, Any]) -> None:
        """Append one JSON line to the run's metrics log."""
        path = self.run_dir(plan) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def metrics(self, plan: str) -> list[dict[str, Any]]:
        """Every metrics record of a plan's runs."""
        path = self.run_dir(plan) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def save_results(self, plan: str, results: dict[str, Any]) -> None:
        """Write the run's ``results.json`` atomically."""
        _write_json_atomic(self.run_dir(plan) / "results.json", results)

    def results(self, plan: str) -> dict[str, Any]:
        """The run's ``results.json`` (empty if none yet)."""
        path = self.run_dir(plan) / "results.json"
        return json.loads(path.read_text()) if path.exists() else {}
