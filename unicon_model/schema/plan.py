"""The plan: model architecture, data settings, ordered stages and ``[evaluation]``."""

from __future__ import annotations

from pydantic import Field, field_validator

from unicon_model.schema.base import Name, _Frozen
from unicon_model.schema.data import DataSpec
from unicon_model.schema.modalities import ModalitySpec
from unicon_model.schema.model import ModelSpec
from unicon_model.schema.stages import StageSpec
from unicon_model.schema.tasks import TaskSpec


class EvaluationSpec(_Frozen):
    """``[evaluation]``: how the plan's model versions are evaluated beyond the federation.

    Attributes
    ----------
    holdout_sites
        Sites kept out of all training (an unseen hospital): the coordinator never selects
        them for a stage's rounds or validation, but asks them to evaluate every learned
        task after every stage; their metrics are recorded apart (``unseen`` in the run's
        results and ``unseen/<task@modality>`` in each version's lineage) and never enter
        ``R``. A plan without holdout sites serialises (and digests) as before.
    """

    holdout_sites: tuple[Name, ...] = ()

    @field_validator("holdout_sites")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            raise ValueError(f"lists {repeated} more than once; name each held-out site once")
        return value


class Plan(_Frozen):
    """A federation plan: model architecture, data settings and ordered stages."""

    name: Name
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    evaluation: EvaluationSpec = Field(
        default=EvaluationSpec(), exclude_if=lambda value: not value.holdout_sites
    )

    def stage(self, name: str) -> StageSpec:
        """Return the stage called ``name`` (``KeyError`` listing the known names)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in plan {self.name!r}; stages: {self.stage_names}")

    @property
    def stage_names(self) -> list[str]:
        """Names of the stages in order."""
        return [s.name for s in self.stages]

    def tasks_until(self, stage_index: int) -> dict[str, TaskSpec]:
        """Every task learned up to and including stage ``stage_index``."""
        return {t.name: t for s in self.stages[: stage_index + 1] for t in s.add_tasks}

    def fitted_heads(self, stage: StageSpec) -> tuple[TaskSpec, ...]:
        """The analytic heads ``stage`` (one of this plan's) fits: :meth:`StageSpec.fitted_heads`
        with the tasks learned up to it."""
        return stage.fitted_heads(self.tasks_until(self.stage_names.index(stage.name)))

    def modalities_until(self, stage_index: int) -> dict[str, ModalitySpec]:
        """Every modality known up to and including stage ``stage_index``."""
        return {m.name: m for s in self.stages[: stage_index + 1] for m in s.add_modalities}

    def stage_modalities(self, stage_index: int) -> tuple[str, ...]:
        """Modalities whose data stage ``stage_index`` trains on."""
        return self.stages[stage_index].trained_modalities(self.modalities_until(stage_index))
