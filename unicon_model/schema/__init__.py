"""The plan and stage schema shared by the coordinator and the sites.

A *plan* declares the model architecture and the ordered *expansion stages*. Each stage says
which components it adds (modality adapters, task heads), which components it trains, on
which tasks and modalities, for how many rounds, with which optimiser, regularisers,
privacy and aggregation settings, and which sites are eligible.

Everything here is a frozen pydantic model, parsed once at the edge (a TOML plan file, the
Flower run config). :func:`validate_plan` reports *every* problem at once, naming the field
(``stages[1].rounds``) and the fix; :func:`load_plan` does the same for a file.

Bounds that keep a plan safe to run at a site (the site parses every request's plan with
:func:`validate_plan`, so a coordinator cannot send past them): every float is finite (no
``inf``/``NaN``, refused by the shared model config), a patch has 1..:data:`MAX_PATCH_EDGE`
voxels per axis and at most :data:`MAX_PATCH_VOXELS` in all (a site may lower that in its
policy, ``max_patch_voxels``), spacings are > 0, timeouts are at most
:data:`MAX_TIMEOUT_S`, and a stage with an EWC or LwF regulariser trains weights the earlier
tasks use.

The schema is split by job: :mod:`~unicon_model.schema.base` (component names, bounds, the
frozen base model), :mod:`~unicon_model.schema.model`, :mod:`~unicon_model.schema.data`,
:mod:`~unicon_model.schema.modalities`, :mod:`~unicon_model.schema.tasks`,
:mod:`~unicon_model.schema.stages` and :mod:`~unicon_model.schema.plan` (the pydantic models),
:mod:`~unicon_model.schema.lenient`, :mod:`~unicon_model.schema.checks` and
:mod:`~unicon_model.schema.component_checks` (field errors and cross-field checks),
:mod:`~unicon_model.schema.validate` (:func:`validate_plan`, :func:`plan_warnings`) and
:mod:`~unicon_model.schema.io` (:func:`load_plan`, :func:`plan_to_dict`). Import from the
package itself: every public name is re-exported here.
"""

from __future__ import annotations

from unicon_model.schema.base import (
    BACKBONE,
    MAX_PATCH_EDGE,
    MAX_PATCH_VOXELS,
    MAX_TIMEOUT_S,
    Name,
    modality_component,
    task_component,
)
from unicon_model.schema.data import AugmentationSpec, DataSpec
from unicon_model.schema.io import load_plan, plan_to_dict
from unicon_model.schema.modalities import ModalitySpec
from unicon_model.schema.model import ModelSpec, PretrainedSpec
from unicon_model.schema.plan import EvaluationSpec, Plan
from unicon_model.schema.stages import (
    EWCSpec,
    LwFSpec,
    OptimizerSpec,
    PrivacySpec,
    ProximalSpec,
    RegulariserSpec,
    SecureAggregationSpec,
    StageSpec,
)
from unicon_model.schema.tasks import PRIMARY_METRIC, SELF_SUPERVISED_KINDS, TaskKind, TaskSpec
from unicon_model.schema.validate import plan_warnings, validate_plan

__all__ = [
    "BACKBONE",
    "MAX_PATCH_EDGE",
    "MAX_PATCH_VOXELS",
    "MAX_TIMEOUT_S",
    "PRIMARY_METRIC",
    "SELF_SUPERVISED_KINDS",
    "AugmentationSpec",
    "DataSpec",
    "EWCSpec",
    "EvaluationSpec",
    "LwFSpec",
    "ModalitySpec",
    "ModelSpec",
    "Name",
    "OptimizerSpec",
    "Plan",
    "PretrainedSpec",
    "PrivacySpec",
    "ProximalSpec",
    "RegulariserSpec",
    "SecureAggregationSpec",
    "StageSpec",
    "TaskKind",
    "TaskSpec",
    "load_plan",
    "modality_component",
    "plan_to_dict",
    "plan_warnings",
    "task_component",
    "validate_plan",
]
