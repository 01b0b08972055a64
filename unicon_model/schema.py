"""The plan and stage schema shared by the coordinator and the sites.

A *plan* declares the model architecture and the ordered *expansion stages*. Each stage says
which components it adds (modality adapters, task heads), which components it trains, on
which tasks and modalities, for how many rounds, with which optimiser, regularisers,
privacy and aggregation settings, and which sites are eligible.

Everything here is a frozen pydantic model, parsed once at the edge (a TOML plan file, the
Flower run config). :func:`validate_plan` reports *every* problem at once, naming the field
(``stages[1].rounds``) and the fix; :func:`load_plan` does the same for a file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from unicon_model.errors import PlanError
from unicon_model.names import NAME_PATTERN

BACKBONE = "backbone"
"""Component name of the shared encoder."""

TaskKind = Literal["classification", "survival", "segmentation"]


def modality_component(name: str) -> str:
    """Return the component name of modality adapter ``name`` (``modality/<name>``)."""
    return f"modality/{name}"


def task_component(name: str) -> str:
    """Return the component name of task head ``name`` (``task/<name>``)."""
    return f"task/{name}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class ModelSpec(_Frozen):
    """Architecture of the backbone and defaults shared by every component.

    Attributes
    ----------
    spatial_dims
        2 for slices, 3 for volumes.
    widths
        Channels of each encoder level; level ``i > 0`` halves the resolution.
    norm
        ``group`` or ``instance`` normalisation (never batch norm, so Opacus accepts it).
    adapter_rank
        Bottleneck channels of the residual adapters inside each encoder level.
    head_hidden
        Hidden width of classification/survival heads.
    seed
        Seed of the deterministic initialisation of every component.
    """

    spatial_dims: Literal[2, 3] = 3
    widths: tuple[int, ...] = Field(default=(8, 16, 32, 64), min_length=2, max_length=6)
    norm: Literal["group", "instance"] = "group"
    adapter_rank: int = Field(default=4, ge=1, le=256)
    head_hidden: int = Field(default=32, ge=1, le=4096)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _widths_positive(self) -> ModelSpec:
        if any(w < 1 or w > 2048 for w in self.widths):
            raise ValueError(f"widths must each be in 1..2048, got {list(self.widths)}")
        return self


class DataSpec(_Frozen):
    """How sites turn their images into tensors for this plan.

    Attributes
    ----------
    patch_size
        Spatial size every case is cropped/padded to (length = ``spatial_dims``).
    spacing
        Voxel spacing (mm) images are resampled to; ``None`` keeps the native spacing.
    ct_window
        Hounsfield window ``(low, high)`` mapped to [0, 1] for CT inputs. The default is the
        abdominal soft-tissue window (level 40, width 400) used to read liver lesions; a lung
        task would declare ``[-1000, 400]``.
    """

    patch_size: tuple[int, ...] = (32, 32, 32)
    spacing: tuple[float, ...] | None = None
    ct_window: tuple[float, float] = (-160.0, 240.0)

    @model_validator(mode="after")
    def _window_is_increasing(self) -> DataSpec:
        low, high = self.ct_window
        if not low < high:
            raise ValueError(
                f"ct_window must be [low, high] with low < high, got {list(self.ct_window)}"
            )
        return self


class ModalitySpec(_Frozen):
    """A modality adapter: an input stem and residual adapters inside the encoder.

    Attributes
    ----------
    name
        Modality name (``ct``, ``pet``).
    inputs
        Image keys of the site manifest stacked as input channels, e.g. ``["ct", "pet"]`` for
        a PET adapter that also sees the CT (PEMMA). Defaults to ``[name]``.
    init_from
        An existing modality whose stem (for shared inputs) and adapters initialise this
        one, with zeros for new inputs, so the new path starts exactly equal to the old one.
    """

    name: Name
    inputs: tuple[Name, ...] = ()
    init_from: Name | None = None

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Image keys stacked as channels (``inputs`` or ``(name,)``)."""
        return self.inputs or (self.name,)


class TaskSpec(_Frozen):
    """A task head.

    Attributes
    ----------
    name
        Task name as used in site manifests (``lesion-class``).
    kind
        ``classification`` (softmax over ``classes``), ``survival`` (Cox risk score) or
        ``segmentation`` (decoder over the feature pyramid, ``labels`` incl. background).
    classes, labels
        Class names (classification) or label names (segmentation), at least two.
    covariates
        Numeric clinical covariates fused into a survival head.
    covariate_scaling
        ``{covariate: [centre, scale]}``: the head sees ``(value - centre) / scale``. Fixed by
        the plan so every site feeds the head the same units (a site's own mean and standard
        deviation would differ from site to site); covariates not listed are used as given.
    head
        ``neural`` (trained by gradient) or ``analytic`` (closed-form ridge on frozen
        features; classification only, trained in one round from summed statistics).
    l2
        Ridge penalty of an analytic head.
    """

    name: Name
    kind: TaskKind
    classes: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    covariate_scaling: dict[str, tuple[float, float]] = Field(default_factory=dict)
    head: Literal["neural", "analytic"] = "neural"
    l2: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _kind_fields(self) -> TaskSpec:
        problems = []
        if self.kind == "classification" and len(self.classes) < 2:
            problems.append("a classification task needs `classes` with at least two names")
        if self.kind != "classification" and self.classes:
            problems.append(f"`classes` is only for classification tasks, not {self.kind}")
        if self.kind == "segmentation" and len(self.labels) < 2:
            problems.append("a segmentation task needs `labels` (background first), at least two")
        if self.kind != "segmentation" and self.labels:
            problems.append(f"`labels` is only for segmentation tasks, not {self.kind}")
        if self.kind != "survival" and self.covariates:
            problems.append(f"`covariates` is only for survival tasks, not {self.kind}")
        unknown = sorted(set(self.covariate_scaling) - set(self.covariates))
        if unknown:
            problems.append(f"`covariate_scaling` names {unknown}, which are not `covariates`")
        flat = [name for name, (_, scale) in self.covariate_scaling.items() if not scale > 0]
        if flat:
            problems.append(f"`covariate_scaling` needs a scale > 0 for {sorted(flat)}")
        if self.head == "analytic" and self.kind != "classification":
            problems.append("head = 'analytic' is only supported for classification tasks")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def scaled_covariates(self, values: Mapping[str, float]) -> list[float]:
        """The covariates in declaration order, scaled by ``covariate_scaling``."""
        scaled = []
        for name in self.covariates:
            centre, scale = self.covariate_scaling.get(name, (0.0, 1.0))
            scaled.append((float(values[name]) - centre) / scale)
        return scaled

    @property
    def num_outputs(self) -> int:
        """Output channels of the head: classes, labels, or 1 risk score."""
        if self.kind == "classification":
            return len(self.classes)
        if self.kind == "segmentation":
            return len(self.labels)
        return 1


class OptimizerSpec(_Frozen):
    """Local optimiser of a stage."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)


class EWCSpec(_Frozen):
    """Elastic weight consolidation (diagonal Fisher aggregated across sites)."""

    kind: Literal["ewc"]
    weight: float = Field(gt=0)


class LwFSpec(_Frozen):
    """Learning without forgetting: distil old tasks from the previous global model."""

    kind: Literal["lwf"]
    weight: float = Field(gt=0)
    temperature: float = Field(default=2.0, gt=0)


class ProximalSpec(_Frozen):
    """L2 anchor to the round's global model (FedProx proximal term)."""

    kind: Literal["fedprox"]
    mu: float = Field(gt=0)


RegulariserSpec = Annotated[EWCSpec | LwFSpec | ProximalSpec, Field(discriminator="kind")]


class PrivacySpec(_Frozen):
    """Differential privacy of a stage.

    Attributes
    ----------
    mode
        ``none``, ``local`` (DP-SGD with Opacus at each site) or ``central`` (server-side
        clipping and noise of the aggregated update).
    target_epsilon, delta
        Budget for the whole stage (all its rounds); the noise is chosen once per stage.
    max_grad_norm
        Per-sample clipping norm (local) or per-update clipping norm (central).
    """

    mode: Literal["none", "local", "central"] = "none"
    target_epsilon: float = Field(default=8.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)


class SecureAggregationSpec(_Frozen):
    """SecAgg+ settings (used when the stage's ``secure_aggregation`` is on)."""

    num_shares: int = Field(default=3, ge=2)
    reconstruction_threshold: int = Field(default=2, ge=2)
    clipping_range: float = Field(default=8.0, gt=0)
    quantization_range: int | None = Field(default=None, ge=2)
    """Quantisation levels; ``None`` picks the largest that cannot overflow for the cohort."""
    max_weight: int = Field(default=100000, ge=1)
    timeout: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _threshold(self) -> SecureAggregationSpec:
        if self.reconstruction_threshold > self.num_shares:
            raise ValueError(
                f"reconstruction_threshold ({self.reconstruction_threshold}) must be <= "
                f"num_shares ({self.num_shares})"
            )
        return self


class StageSpec(_Frozen):
    """One expansion stage.

    Attributes
    ----------
    name
        Unique stage name.
    add_modalities, add_tasks
        Components grown at the start of the stage (by the server only).
    train
        Component names trained in the stage (``backbone``, ``modality/ct``, ``task/x``);
        only these travel back from the sites. Default: the components the stage adds.
    objectives
        Tasks whose losses are optimised. Default: the tasks the stage adds.
    modalities
        Modalities whose data the stage trains on. Default: the modalities the stage adds,
        or every modality known so far if it adds none.
    min_sites
        The stage fails with a clear error when fewer eligible sites are connected.
    max_update_norm
        Absolute bound on the L2 distance between a site's returned components and the global
        values it was sent; the coordinator rejects a larger update whatever the cohort size
        (the relative cohort rule needs 3 or more sites).
    """

    name: Name
    add_modalities: tuple[ModalitySpec, ...] = ()
    add_tasks: tuple[TaskSpec, ...] = ()
    train: tuple[str, ...] = ()
    objectives: tuple[Name, ...] = ()
    modalities: tuple[Name, ...] = ()
    rounds: int = Field(default=3, ge=1, le=10000)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=4, ge=1, le=4096)
    optimizer: OptimizerSpec = OptimizerSpec()
    regularisers: tuple[RegulariserSpec, ...] = ()
    min_sites: int = Field(default=1, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    secure_aggregation: bool = False
    secagg: SecureAggregationSpec = SecureAggregationSpec()
    privacy: PrivacySpec = PrivacySpec()
    round_timeout: float = Field(default=600.0, gt=0)
    max_update_norm: float = Field(default=1000.0, gt=0, allow_inf_nan=False)

    @property
    def trained_components(self) -> tuple[str, ...]:
        """``train`` or, if empty, the components this stage adds."""
        if self.train:
            return self.train
        added = [modality_component(m.name) for m in self.add_modalities]
        return tuple(added + [task_component(t.name) for t in self.add_tasks])

    @property
    def objective_tasks(self) -> tuple[str, ...]:
        """``objectives`` or, if empty, the tasks this stage adds."""
        return self.objectives or tuple(t.name for t in self.add_tasks)

    @property
    def is_analytic(self) -> bool:
        """Whether the stage only fits analytic heads (one round of summed statistics)."""
        return bool(self.add_tasks) and all(t.head == "analytic" for t in self.add_tasks)


class Plan(_Frozen):
    """A federation plan: model architecture, data settings and ordered stages."""

    name: Name
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    stages: tuple[StageSpec, ...] = Field(min_length=1)

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

    def modalities_until(self, stage_index: int) -> dict[str, ModalitySpec]:
        """Every modality known up to and including stage ``stage_index``."""
        return {m.name: m for s in self.stages[: stage_index + 1] for m in s.add_modalities}

    def stage_modalities(self, stage_index: int) -> tuple[str, ...]:
        """Modalities whose data stage ``stage_index`` trains on."""
        stage = self.stages[stage_index]
        if stage.modalities:
            return stage.modalities
        if stage.add_modalities:
            return tuple(m.name for m in stage.add_modalities)
        return tuple(self.modalities_until(stage_index))


def _format_validation_error(prefix: str, error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = prefix
        for part in item["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the plan format in README)"
        problems.append(f"{loc or '<plan>'}: {message}")
    return problems


def _cross_stage_problems(plan: Plan) -> list[str]:
    """Checks that span stages: names defined before use, no duplicates, valid growth."""
    problems: list[str] = []
    modalities: dict[str, ModalitySpec] = {}
    tasks: dict[str, TaskSpec] = {}
    stage_names: set[str] = set()
    dims = plan.model.spatial_dims
    if len(plan.data.patch_size) != dims:
        problems.append(
            f"data.patch_size: has {len(plan.data.patch_size)} values but model.spatial_dims "
            f"is {dims}; give one size per spatial dimension"
        )
    if plan.data.spacing is not None and len(plan.data.spacing) != dims:
        problems.append(f"data.spacing: give {dims} values (one per spatial dimension)")
    levels = len(plan.model.widths)
    if any(p % 2 ** (levels - 1) for p in plan.data.patch_size):
        problems.append(
            f"data.patch_size: each size must be divisible by {2 ** (levels - 1)} "
            f"(the encoder halves the resolution {levels - 1} times)"
        )
    for i, stage in enumerate(plan.stages):
        at = f"stages[{i}]"
        if stage.name in stage_names:
            problems.append(f"{at}.name: stage name {stage.name!r} is used twice")
        stage_names.add(stage.name)
        for j, mod in enumerate(stage.add_modalities):
            if mod.name in modalities:
                problems.append(
                    f"{at}.add_modalities[{j}]: modality {mod.name!r} already exists; "
                    "train its component instead of adding it again"
                )
            if mod.init_from is not None and mod.init_from not in modalities:
                problems.append(
                    f"{at}.add_modalities[{j}].init_from: {mod.init_from!r} is not a modality "
                    f"added by an earlier stage (known: {sorted(modalities)})"
                )
        for j, task in enumerate(stage.add_tasks):
            if task.name in tasks:
                problems.append(f"{at}.add_tasks[{j}]: task {task.name!r} already exists")
        modalities.update({m.name: m for m in stage.add_modalities})
        tasks.update({t.name: t for t in stage.add_tasks})
        known = {BACKBONE} | {modality_component(m) for m in modalities}
        known |= {task_component(t) for t in tasks}
        for j, component in enumerate(stage.train):
            if component not in known:
                problems.append(
                    f"{at}.train[{j}]: unknown component {component!r}; known so far: "
                    f"{sorted(known)}"
                )
            elif component.startswith("task/") and tasks[component[5:]].head == "analytic":
                problems.append(
                    f"{at}.train[{j}]: {component!r} is an analytic head; it is fitted in "
                    "closed form by the stage that adds it, not trained by gradient"
                )
        for j, task_name in enumerate(stage.objectives):
            if task_name not in tasks:
                problems.append(f"{at}.objectives[{j}]: unknown task {task_name!r}")
        for j, mod_name in enumerate(stage.modalities):
            if mod_name not in modalities:
                problems.append(f"{at}.modalities[{j}]: unknown modality {mod_name!r}")
        if not modalities:
            problems.append(f"{at}: no modality exists yet; add one with add_modalities")
        if not stage.objective_tasks:
            problems.append(f"{at}: the stage has no objective; add a task or set objectives")
        analytic = [t.name for t in stage.add_tasks if t.head == "analytic"]
        if analytic and len(analytic) != len(stage.add_tasks):
            problems.append(
                f"{at}.add_tasks: analytic heads {analytic} must be added in a stage of their own"
            )
        if analytic and (stage.train or stage.rounds != 1 or stage.privacy.mode == "local"):
            problems.append(
                f"{at}: an analytic stage sends statistics once: set rounds = 1, leave `train` "
                "empty and use privacy mode 'none' or 'central'"
            )
        if stage.secure_aggregation and stage.privacy.mode == "central":
            problems.append(
                f"{at}: central DP needs the server to clip individual updates, which secure "
                "aggregation hides; use privacy mode 'local' with secure aggregation"
            )
        if stage.secure_aggregation and stage.min_sites < stage.secagg.num_shares:
            problems.append(
                f"{at}.min_sites: secure aggregation with num_shares = {stage.secagg.num_shares}"
                f" needs min_sites >= {stage.secagg.num_shares}"
            )
    return problems


def validate_plan(data: Mapping[str, Any], *, source: str | None = None) -> Plan:
    """Parse a plan from plain data, reporting every problem at once.

    Parameters
    ----------
    data
        The plan as parsed from TOML/JSON.
    source
        File name used in the error message.

    Returns
    -------
    Plan
        The validated, frozen plan.

    Raises
    ------
    PlanError
        With every problem found: field errors of every stage and cross-stage errors of the
        stages that parsed.
    """
    problems: list[str] = []
    raw = dict(data)
    raw_stages = raw.pop("stages", None)
    stages: list[StageSpec] = []
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append("stages: the plan needs at least one [[stages]] table")
        raw_stages = []
    adapter = TypeAdapter(StageSpec)
    for i, raw_stage in enumerate(raw_stages):
        try:
            stages.append(adapter.validate_python(raw_stage))
        except ValidationError as e:
            problems.extend(_format_validation_error(f"stages[{i}]", e))
    placeholder = StageSpec(name="placeholder", add_tasks=())
    try:
        plan = Plan.model_validate({**raw, "stages": stages or [placeholder]})
    except ValidationError as e:
        problems.extend(_format_validation_error("", e))
        plan = None
    if plan is not None and stages and len(stages) == len(raw_stages):
        problems.extend(_cross_stage_problems(plan))
    if problems or plan is None:
        raise PlanError(problems, source)
    return plan


def load_plan(path: str | Path) -> Plan:
    """Load and validate a TOML (or JSON) plan file.

    Raises
    ------
    PlanError
        If the file is missing, not valid TOML/JSON, or the plan is invalid (every problem).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError([f"cannot read the plan file: {e.strerror or e}"], str(path)) from e
    try:
        if path.suffix == ".json":
            import json

            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except ValueError as e:
        raise PlanError([f"not valid {path.suffix.lstrip('.') or 'TOML'}: {e}"], str(path)) from e
    if not isinstance(data, dict):
        raise PlanError(["the plan must be a table/object at the top level"], str(path))
    return validate_plan(data, source=str(path))


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """JSON-able form of a plan (round-trips through :func:`validate_plan`)."""
    return plan.model_dump(mode="json")
