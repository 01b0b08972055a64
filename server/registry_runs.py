"""A plan's run state in the registry: progress, the round in flight, the best round.

Layout under the registry root::

    runs/<plan>/progress.json      completed stages (with their versions), stage in progress
    runs/<plan>/round/             global model after the last completed round of that stage
    runs/<plan>/best-<round>/      the stage's best-validated round so far (keep_best)

Every write is atomic (temporary file or directory, then rename), so a crash of the
coordinator loses at most the round in flight. :class:`RunState` holds the methods;
:class:`server.registry.Registry` has them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from server.errors import RegistryError
from unicon_model.checkpoint import CheckpointManifest, Lineage, load_checkpoint, save_checkpoint
from unicon_model.components import split_by_component
from unicon_model.durable import atomic_write
from unicon_model.errors import CheckpointError
from unicon_model.model import UniconModel
from unicon_model.names import check_name, path_under

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


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` by ``data`` as JSON: temporary sibling, fsync, rename, fsync folder.

    The data is serialised before anything is written, and the temporary file is removed on
    any failure, so the old file stays intact unless the new one is complete.
    """
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, prefix=f".{path.name}-")


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


def _model_of(
    manifest: CheckpointManifest, components: dict[str, dict[str, Tensor]]
) -> UniconModel:
    """The model a loaded checkpoint describes, its tensors loaded."""
    model = UniconModel.from_config(dict(manifest.model_config_))
    model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
    return model


class RunState:
    """The run-state methods of :class:`server.registry.Registry` (``runs/<plan>/``).

    Attributes
    ----------
    runs_dir
        The ``runs`` folder of the registry.
    """

    runs_dir: Path

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
        write_json_atomic(
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
        return _model_of(manifest, components), manifest

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
        return _model_of(manifest, components)

    def prune_best(self, plan: str, keep: int | None) -> None:
        """Delete every best-round checkpoint of ``plan`` but ``best-<keep>``."""
        run = self.run_dir(plan)
        if not run.is_dir():
            return
        for path in run.iterdir():
            if path.name.startswith(("best-", ".best-")) and path.name != f"best-{keep}":
                shutil.rmtree(path, ignore_errors=True)
