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
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from unicon_model.config_io import DocumentWording, load_document, pydantic_problems
from unicon_model.errors import PlanError
from unicon_model.names import NAME_PATTERN, is_valid_name

BACKBONE = "backbone"
"""Component name of the shared encoder."""

TaskKind = Literal["classification", "survival", "segmentation", "reconstruction"]

SELF_SUPERVISED_KINDS = frozenset({"reconstruction"})
"""Task kinds trained without labels: every case with the route's images counts."""

PRIMARY_METRIC: dict[str, str] = {
    "classification": "accuracy",
    "survival": "cindex",
    "segmentation": "dice",
    "reconstruction": "psnr",
}
"""The metric of each task kind that enters R[stage, task@modality] and the validation score
(higher is better)."""

MAX_PATCH_EDGE = 4096
"""Largest ``data.patch_size`` entry (voxels along one axis)."""
MAX_PATCH_VOXELS = 256**3
"""Largest patch in voxels (the product of ``data.patch_size``): 16.8 M, a 256³ volume or a
4096² slice; as float32 that is 64 MiB per input channel and case before the encoder's
activations. A site lowers it with ``max_patch_voxels`` in its policy."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Longest timeout a plan may set (seconds): 7 days."""


def modality_component(name: str) -> str:
    """Return the component name of modality adapter ``name`` (``modality/<name>``)."""
    return f"modality/{name}"


def task_component(name: str) -> str:
    """Return the component name of task head ``name`` (``task/<name>``)."""
    return f"task/{name}"


class _Frozen(BaseModel):
    # allow_inf_nan=False: every float of a plan (lr, weights, epsilon, windows...) is finite
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class PretrainedSpec(_Frozen):
    """``[model.pretrained]``: seed components of the first stage from a local file.

    Only the coordinator reads the file (:func:`unicon_model.pretrained.seed_from_pretrained`);
    sites receive the seeded components as usual.

    Attributes
    ----------
    path
        The file or folder; a relative path is resolved against the coordinator's current
        working directory (use an absolute path in deployments).
    format
        ``unicon`` (a registry version or an export: a folder with ``manifest.json``),
        ``safetensors`` (a torch/MONAI state dict saved with safetensors) or ``torch`` (a
        ``.pt``/``.pth`` state dict of tensors, read with ``torch.load(weights_only=True)``);
        by default guessed from the path (folder, ``.safetensors``, ``.pt``/``.pth``/``.bin``).
    components
        Components to seed (``backbone``, ``modality/<name>``, ``task/<name>``) of the
        model as grown by the first stage. By default ``backbone`` plus every first-stage
        modality adapter the file holds.
    mapping
        Key prefix renames from the file's names to the model's, e.g.
        ``{"encoder." = "backbone."}``; the longest matching prefix wins.
    ignore
        Prefixes (the file's names) of tensors to skip, e.g. a decoder's ``["decoder."]``.
    strict
        Refuse a file with missing, unexpected or wrong-shaped keys (default); when false,
        load the matching keys and log a warning listing the rest.
    sha256
        Optional pin: refuse the file unless its sha256 (of ``manifest.json`` for a
        ``unicon`` folder) is this one.
    """

    path: str = Field(min_length=1, max_length=4096)
    format: Literal["unicon", "safetensors", "torch"] | None = None
    components: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=64)
    mapping: dict[str, str] = Field(default_factory=dict, max_length=256)
    ignore: tuple[str, ...] = Field(default=(), max_length=256)
    strict: bool = True
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("components")
    @classmethod
    def _component_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        bad = []
        for name in value:
            kind, _, rest = name.partition("/")
            if name != BACKBONE and not (kind in ("modality", "task") and is_valid_name(rest)):
                bad.append(name)
        if bad:
            raise ValueError(
                f"{bad} are not component names; use 'backbone', 'modality/<name>' or 'task/<name>'"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"{list(value)} lists a component twice")
        return value

    @field_validator("mapping")
    @classmethod
    def _mapping_bounded(cls, value: dict[str, str]) -> dict[str, str]:
        long = [k for k, v in value.items() if len(k) > 512 or len(v) > 512]
        if long:
            raise ValueError(f"prefixes longer than 512 characters: {long[:3]}")
        return value


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
    pretrained
        Seed the first stage's components from a local file (``[model.pretrained]``, see
        :class:`PretrainedSpec`) instead of the seeded random initialisation.
    """

    spatial_dims: Literal[2, 3] = 3
    widths: tuple[int, ...] = Field(default=(8, 16, 32, 64), min_length=2, max_length=6)
    norm: Literal["group", "instance"] = "group"
    adapter_rank: int = Field(default=4, ge=1, le=256)
    head_hidden: int = Field(default=32, ge=1, le=4096)
    seed: int = Field(default=0, ge=0)
    pretrained: PretrainedSpec | None = None

    @model_validator(mode="after")
    def _widths_positive(self) -> ModelSpec:
        if any(w < 1 or w > 2048 for w in self.widths):
            raise ValueError(f"widths must each be in 1..2048, got {list(self.widths)}")
        return self


class AugmentationSpec(_Frozen):
    """Random augmentation of the training cases (MONAI dictionary transforms).

    Applied at each site, on the fly, to the *training* samples only: every time a case is
    drawn into a local training batch it gets a fresh random transform. Evaluation (val, test,
    and any evaluation of the train split), analytic statistics, EWC's Fisher information and
    inference never see augmented data. The randomness follows the local training's seed: a
    seeded run is reproducible, and a DP-SGD run (whose seed is a secret drawn from
    ``os.urandom`` at the site) augments unpredictably to the coordinator too.

    Spatial transforms move the image channels and every segmentation mask of the case
    together (masks with nearest-neighbour interpolation, so they keep integer labels);
    intensity transforms change the image only. Classification and survival labels and the
    clinical covariates pass through unchanged. The images are already normalised to about
    [0, 1] (see :class:`DataSpec`), so intensity amounts are in those units.

    Everything is off by default: an option's amount is used only when its probability is
    above 0. The transforms run in this order: flips, affine, intensity scale, intensity
    shift, noise.

    Attributes
    ----------
    flip_prob
        Probability of mirroring the case along each spatial axis, drawn independently per
        axis (``RandFlipd``). In [0, 1]; default 0 (off).
    affine_prob
        Probability of one random rotation plus scaling of the case (``RandAffined``, zero
        padding, image bilinear, masks nearest). In [0, 1]; default 0 (off).
    rotate_deg
        Largest rotation angle in degrees: the angle about each axis (the in-plane angle in
        2D) is uniform in ``[-rotate_deg, rotate_deg]``. In [0, 180]; default 10.
    scale_range
        Largest relative zoom of the affine: the factor along each axis is uniform in
        ``[1 - scale_range, 1 + scale_range]``. In [0, 0.5]; default 0.1.
    intensity_prob
        Probability of each of the intensity scale and the intensity shift, drawn
        independently (``RandScaleIntensityd``, ``RandShiftIntensityd``). In [0, 1]; default
        0 (off).
    intensity_scale
        Largest relative change of the image intensities: they are multiplied by
        ``1 + f`` with ``f`` uniform in ``[-intensity_scale, intensity_scale]``. In [0, 0.5];
        default 0.1.
    intensity_shift
        Largest offset added to the image intensities, uniform in
        ``[-intensity_shift, intensity_shift]``. In [0, 0.5]; default 0.1.
    noise_prob
        Probability of adding Gaussian noise to the image (``RandGaussianNoised``). In
        [0, 1]; default 0 (off).
    noise_std
        Standard deviation of that noise. In [0, 0.5]; default 0.05.
    """

    flip_prob: float = Field(default=0.0, ge=0, le=1)
    affine_prob: float = Field(default=0.0, ge=0, le=1)
    rotate_deg: float = Field(default=10.0, ge=0, le=180)
    scale_range: float = Field(default=0.1, ge=0, le=0.5)
    intensity_prob: float = Field(default=0.0, ge=0, le=1)
    intensity_scale: float = Field(default=0.1, ge=0, le=0.5)
    intensity_shift: float = Field(default=0.1, ge=0, le=0.5)
    noise_prob: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=0.05, ge=0, le=0.5)

    @property
    def enabled(self) -> bool:
        """Whether any transform can change a sample (a probability and its amount > 0)."""
        return (
            self.flip_prob > 0
            or (self.affine_prob > 0 and (self.rotate_deg > 0 or self.scale_range > 0))
            or (self.intensity_prob > 0 and (self.intensity_scale > 0 or self.intensity_shift > 0))
            or (self.noise_prob > 0 and self.noise_std > 0)
        )


class DataSpec(_Frozen):
    """How sites turn their images into tensors for this plan.

    Attributes
    ----------
    patch_size
        Spatial size every case is cropped/padded to (length = ``spatial_dims``); each entry
        in 1..:data:`MAX_PATCH_EDGE`, at most :data:`MAX_PATCH_VOXELS` voxels in all.
    spacing
        Voxel spacing (mm, each > 0) images are resampled to; ``None`` keeps the native
        spacing.
    ct_window
        Hounsfield window ``(low, high)`` mapped to [0, 1] for CT inputs. The default is the
        abdominal soft-tissue window (level 40, width 400) used to read liver lesions; a lung
        task would declare ``[-1000, 400]``.
    augmentation
        Random augmentation of the training cases (``[data.augmentation]``); off by default.
        See :class:`AugmentationSpec`.
    """

    patch_size: tuple[Annotated[int, Field(ge=1, le=MAX_PATCH_EDGE)], ...] = (32, 32, 32)
    spacing: tuple[Annotated[float, Field(gt=0)], ...] | None = None
    ct_window: tuple[float, float] = (-160.0, 240.0)
    augmentation: AugmentationSpec = AugmentationSpec()

    @field_validator("patch_size")
    @classmethod
    def _patch_not_too_large(cls, patch: tuple[int, ...]) -> tuple[int, ...]:
        voxels = math.prod(patch)
        if voxels > MAX_PATCH_VOXELS:
            raise ValueError(
                f"{list(patch)} is {voxels} voxels, more than the maximum {MAX_PATCH_VOXELS} "
                f"(256³); use a smaller patch, e.g. {[min(p, 256) for p in patch]}"
            )
        return patch

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
    lora_rank
        Rank of the low-rank deltas (LoRA, ``ΔW = B·A`` with ``B = 0`` at first) this modality
        adds to the shared encoder's convolutions; they apply only on its routes and belong
        to ``modality/<name>``. ``0`` (default): none. At most ``min(in, out)`` channels of
        every adapted level.
    lora_levels
        Encoder levels (``0`` = finest) that get deltas; empty: all levels.
    decoder_lora
        ``{task: rank}``: low-rank deltas this modality adds to the decoder convolutions of
        an existing segmentation task (each clamped to the convolution's ``min(in, out)``),
        applied only on the route ``task@<name>``. A new input such as PET changes what the
        encoder's features mean; these let the route's decoder read them, while the task's
        own decoder and every other route stay exactly as they were. The task must be added
        by an earlier stage.
    """

    name: Name
    inputs: tuple[Name, ...] = ()
    init_from: Name | None = None
    lora_rank: int = Field(default=0, ge=0, le=256)
    lora_levels: tuple[int, ...] = Field(default=(), max_length=8)
    decoder_lora: dict[Name, Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=dict, max_length=64
    )

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
        ``classification`` (softmax over ``classes``), ``survival`` (Cox risk score),
        ``segmentation`` (decoder over the feature pyramid, ``labels`` incl. background) or
        ``reconstruction`` (self-supervised: masked-volume reconstruction, no labels; a
        light decoder predicts the hidden blocks of the input from the rest, so the stage
        trains the encoder on every case of every site. Its metric, PSNR on the masked
        voxels of the ``val`` split, drives the stage's validation only: it never enters R,
        and the decoder serves no route after its stage).
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
    lora_rank
        Rank of the low-rank deltas (LoRA, ``ΔW = B·A`` with ``B = 0`` at first) this task
        adds to the shared encoder's convolutions; they apply only on its routes
        ``<task>@<modality>`` and belong to ``task/<name>``, so training the task leaves every
        other route's output unchanged. ``0`` (default): none. Neural heads only; at most
        ``min(in, out)`` channels of every adapted level.
    lora_levels
        Encoder levels (``0`` = finest) that get deltas; empty: all levels.
    foreground_prior
        Segmentation: the expected fraction of foreground voxels, split evenly over the
        labels after background. The head's output bias starts at this prior, so a new
        head predicts background with the data's odds instead of foreground almost
        everywhere (whose cross-entropy correction would otherwise erase all contrast and
        leave argmax Dice at 0 for several rounds). Default 0.01; in (0, 0.5].
    mask_ratio
        Reconstruction: the fraction of the input's blocks hidden (set to 0) in each
        sample; the loss is the mean squared error on the hidden voxels. Default 0.6.
    mask_size
        Reconstruction: the edge of a hidden block in voxels (each spatial size of the
        patch must be a multiple). Default 4.
    channels
        Reconstruction: how many of the route's input channels are hidden and predicted
        (the first ones, in the modality's ``inputs`` order). Default 1.
    """

    name: Name
    kind: TaskKind
    classes: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    covariate_scaling: dict[str, tuple[float, float]] = Field(default_factory=dict)
    head: Literal["neural", "analytic"] = "neural"
    l2: float = Field(default=1.0, gt=0)
    foreground_prior: float = Field(default=0.01, gt=0, le=0.5)
    lora_rank: int = Field(default=0, ge=0, le=256)
    lora_levels: tuple[int, ...] = Field(default=(), max_length=8)
    mask_ratio: float = Field(default=0.6, gt=0, lt=1)
    mask_size: int = Field(default=4, ge=1, le=MAX_PATCH_EDGE)
    channels: int = Field(default=1, ge=1, le=64)

    @property
    def self_supervised(self) -> bool:
        """Whether the task trains without labels (every case with images counts)."""
        return self.kind in SELF_SUPERVISED_KINDS

    @model_validator(mode="after")
    def _kind_fields(self) -> TaskSpec:
        problems = []
        if self.kind != "reconstruction":
            problems += [
                f"`{name}` is only for reconstruction tasks, not {self.kind}"
                for name in ("mask_ratio", "mask_size", "channels")
                # a dumped plan carries every default, so only a changed value is a mistake
                if getattr(self, name) != type(self).model_fields[name].default
            ]
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
        if self.kind == "reconstruction":
            return self.channels
        return 1


def _lora_problems(
    model: ModelSpec | None,
    model_bad: frozenset[str],
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
) -> list[str]:
    """LoRA settings of every added modality and task that the encoder cannot honour.

    Ranks larger than an adapted level's channels, levels the encoder does not have,
    ``lora_levels`` without a rank, and deltas on analytic heads (which have no gradient).
    """
    problems: list[str] = []
    widths_ok = model is not None and _valid(model_bad, "widths")
    widths = model.widths if model is not None else ()
    for i, (stage, _) in enumerate(stages):
        if stage is None:
            continue
        specs: list[tuple[str, ModalitySpec | TaskSpec]] = [
            (f"stages[{i}].add_modalities[{j}]", m) for j, m in enumerate(stage.add_modalities)
        ]
        specs += [(f"stages[{i}].add_tasks[{j}]", t) for j, t in enumerate(stage.add_tasks)]
        for at, spec in specs:
            rank, levels = spec.lora_rank, spec.lora_levels
            if levels and rank == 0:
                problems.append(
                    f"{at}.lora_levels: set but lora_rank is 0 (no deltas); give lora_rank >= 1 "
                    "or remove lora_levels"
                )
            if isinstance(spec, TaskSpec) and spec.head == "analytic" and rank > 0:
                problems.append(
                    f"{at}.lora_rank: an analytic head is fitted in closed form on frozen "
                    "features and cannot train encoder deltas; set lora_rank = 0 or use "
                    "head = 'neural'"
                )
            duplicates = sorted({v for v in levels if levels.count(v) > 1})
            if duplicates:
                problems.append(f"{at}.lora_levels: levels {duplicates} are listed twice")
            if not widths_ok:
                continue
            last = len(widths) - 1
            for k, level in enumerate(levels):
                if not 0 <= level <= last:
                    problems.append(
                        f"{at}.lora_levels[{k}]: encoder level {level} does not exist; the "
                        f"encoder has levels 0..{last} (one per model.widths entry)"
                    )
            chosen = [v for v in levels if 0 <= v <= last] or list(range(last + 1))
            channels = {v: min(widths[max(v - 1, 0)], widths[v]) for v in sorted(set(chosen))}
            too_small = {v: c for v, c in channels.items() if rank > c}
            if rank > 0 and too_small:
                shown = ", ".join(f"level {v} ({c} channels)" for v, c in too_small.items())
                problems.append(
                    f"{at}.lora_rank: rank {rank} exceeds the channels of {shown}; a delta's "
                    f"rank is at most min(in, out) channels of the level's convolutions: use "
                    f"lora_rank <= {min(channels.values())} or adapt other lora_levels"
                )
    return problems


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
    timeout: float = Field(default=60.0, gt=0, le=MAX_TIMEOUT_S)

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
    round_timeout
        Seconds the coordinator waits for a round's replies; at most :data:`MAX_TIMEOUT_S`.
    max_update_norm
        Absolute bound on the L2 distance between a site's returned components and the global
        values it was sent; the coordinator rejects a larger update whatever the cohort size
        (the relative cohort rule needs 3 or more sites).
    validate_every
        Rounds between validations (1: after every round; 0: never). A validation asks the
        training sites for metrics on their ``val`` split; the round's *validation score* is
        the mean, over the stage's objective tasks on the stage's modality routes, of each
        ``task@modality``'s primary metric (accuracy, C-index, Dice; higher is better), each
        the case-weighted mean of the sites' metrics. Routes no site reports are left out.
        Analytic stages run one round and are not validated.
    keep_best
        Commit the round with the best validation score (the latest of equal best ones), not
        the last; its round number is in the version's lineage (``metrics["val/kept_round"]``).
        Without any validation score the last round is committed.
    patience
        Stop the stage after this many validations in a row without an improvement of more
        than ``min_delta`` over the best score (``None``: run every round). A validation that
        no site reported a metric for does not count. Needs ``validate_every`` > 0.
    min_delta
        Smallest increase of the validation score that counts as an improvement for
        ``patience`` (a smaller gain is still kept).
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
    round_timeout: float = Field(default=600.0, gt=0, le=MAX_TIMEOUT_S)
    max_update_norm: float = Field(default=1000.0, gt=0, allow_inf_nan=False)
    validate_every: int = Field(default=1, ge=0, le=10000)
    keep_best: bool = True
    patience: int | None = Field(default=None, ge=1, le=10000)
    min_delta: float = Field(default=0.0, ge=0, allow_inf_nan=False)

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

    def modalities_until(self, stage_index: int) -> dict[str, ModalitySpec]:
        """Every modality known up to and including stage ``stage_index``."""
        return {m.name: m for s in self.stages[: stage_index + 1] for m in s.add_modalities}

    def stage_modalities(self, stage_index: int) -> tuple[str, ...]:
        """Modalities whose data stage ``stage_index`` trains on."""
        return _stage_routes(self.stages[stage_index], self.modalities_until(stage_index))


def _format_validation_error(prefix: str, error: ValidationError) -> list[str]:
    return pydantic_problems(
        error,
        prefix=prefix,
        root="<plan>",
        unknown="check the spelling; see the plan format in README",
        translate=_plan_message,
    )


def _plan_message(item: ErrorDetails) -> str | None:
    if item["type"] == "finite_number":
        return f"got {item['input']!r}; give a finite number (inf and NaN are refused)"
    return None


_STAND_IN = "invalid-stand-in-"
"""Name prefix of the stand-ins of invalid stages, modalities and tasks (never shown)."""

_Spec = TypeVar("_Spec", bound=BaseModel)
_Repair = Callable[[dict[str, Any], tuple[int | str, ...]], bool]


def _lenient(
    cls: type[_Spec], raw: object, repair: _Repair | None = None
) -> tuple[_Spec | None, frozenset[str]]:
    """``cls`` parsed from ``raw`` with its invalid fields replaced, and the replaced fields.

    Lets the cross-stage checks run on a plan whose field errors are already reported: an
    invalid field takes its default (or ``repair`` puts a stand-in in its place, which is not
    counted as replaced), and a check that reads a replaced field is skipped. Returns
    ``(None, {"*"})`` when nothing can stand in (not a table, an error of the whole object).
    """
    if not isinstance(raw, Mapping):
        return None, frozenset({"*"})
    data = dict(raw)
    replaced: set[str] = set()
    for _ in range(8):
        try:
            return cls.model_validate(data), frozenset(replaced)
        except ValidationError as e:
            errors = e.errors()
        for item in errors:
            loc = tuple(item["loc"])
            if not loc:
                return None, frozenset({"*"})
            if repair is None or not repair(data, loc):
                replaced.add(str(loc[0]))
                data.pop(str(loc[0]), None)
    return None, frozenset({"*"})


def _stand_in(key: str, element: object, tag: str) -> dict[str, Any]:
    """A valid stand-in for an invalid ``add_modalities``/``add_tasks`` element.

    It keeps the element's name (and ``init_from``/``head``), so later stages that refer to
    it are checked as usual.
    """
    raw: Mapping[str, Any] = element if isinstance(element, Mapping) else {}
    name = raw.get("name") if is_valid_name(raw.get("name")) else f"{_STAND_IN}{tag}"
    if key == "add_modalities":
        init_from = raw.get("init_from")
        return {"name": name, "init_from": init_from if is_valid_name(init_from) else None}
    head = raw.get("head") if raw.get("head") in ("neural", "analytic") else "neural"
    return {"name": name, "kind": "classification", "classes": ["a", "b"], "head": head}


def _stage_repair(index: int) -> _Repair:
    def repair(data: dict[str, Any], loc: tuple[int | str, ...]) -> bool:
        key = loc[0]
        if key == "name":
            data["name"] = f"{_STAND_IN}stage-{index}"
            return True
        elements = data.get(str(key))
        if (
            key in ("add_modalities", "add_tasks")
            and len(loc) > 1
            and isinstance(loc[1], int)
            and isinstance(elements, list)
            and loc[1] < len(elements)
        ):
            elements = list(elements)
            elements[loc[1]] = _stand_in(key, elements[loc[1]], f"{index}-{loc[1]}")
            data[key] = elements
            return True
        return False

    return repair


def _shown(names: Iterable[str]) -> list[str]:
    """Sorted names without the stand-ins of invalid entries."""
    return sorted(n for n in names if _STAND_IN not in n)


def _valid(replaced: frozenset[str], *fields: str) -> bool:
    """Whether none of ``fields`` (nor the whole object) was replaced by :func:`_lenient`."""
    return not replaced & {"*", *fields}


def _header_problems(
    model: ModelSpec | None,
    model_bad: frozenset[str],
    data: DataSpec | None,
    data_bad: frozenset[str],
) -> list[str]:
    """Checks between ``model`` and ``data`` that read only fields that are valid."""
    problems: list[str] = []
    if model is None or data is None:
        return problems
    dims = model.spatial_dims
    dims_ok = _valid(model_bad, "spatial_dims")
    patch_ok = _valid(data_bad, "patch_size")
    if dims_ok and patch_ok and len(data.patch_size) != dims:
        problems.append(
            f"data.patch_size: has {len(data.patch_size)} values but model.spatial_dims "
            f"is {dims}; give one size per spatial dimension"
        )
    spacing = data.spacing
    if dims_ok and _valid(data_bad, "spacing") and spacing is not None and len(spacing) != dims:
        problems.append(f"data.spacing: give {dims} values (one per spatial dimension)")
    halvings = len(model.widths) - 1
    if _valid(model_bad, "widths") and patch_ok and any(p % 2**halvings for p in data.patch_size):
        problems.append(
            f"data.patch_size: each size must be divisible by {2**halvings} "
            f"(the encoder halves the resolution {halvings} times)"
        )
    return problems


def _forgetting_problems(
    at: str,
    stage: StageSpec,
    earlier: Mapping[str, TaskSpec],
    modalities: Mapping[str, ModalitySpec],
) -> list[str]:
    """EWC and LwF need the stage to train weights that the earlier tasks use.

    Both protect the earlier tasks (learned before the stage and not among its objectives)
    through the weights the stage trains: EWC needs their gradient (a site would fail with
    "element 0 of tensors does not require grad"), LwF's distillation is constant otherwise.
    On a site's route ``modality`` those weights are the backbone, the earlier tasks' heads
    and ``modality/<modality>``; every modality of the stage must be covered.
    """
    regularised = [(j, r.kind) for j, r in enumerate(stage.regularisers) if r.kind != "fedprox"]
    old = [name for name in earlier if name not in stage.objective_tasks]
    if not regularised or not old:
        return []
    trained = set(stage.trained_components)
    if BACKBONE in trained or any(task_component(t) in trained for t in old):
        return []
    routes = stage.modalities or tuple(m.name for m in stage.add_modalities) or tuple(modalities)
    uncovered = [modality_component(m) for m in routes if modality_component(m) not in trained]
    if not uncovered:
        return []
    return [
        f"{at}.regularisers[{j}]: {kind} protects the earlier tasks {old} through the weights "
        f"they share with this stage, but the stage trains only {sorted(trained)}, which those "
        f"tasks do not use; add 'backbone' (or {uncovered}) to `train`, or remove the "
        "regulariser"
        for j, kind in regularised
    ]


def _cross_stage_problems(
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
) -> list[str]:
    """Checks that span stages: names defined before use, no duplicates, valid growth.

    ``stages`` pairs each stage (a stand-in for an invalid one, ``None`` if there is none)
    with its replaced fields; a check that reads a replaced field is skipped, and the checks
    of names defined earlier stop at a stage without a stand-in.
    """
    problems: list[str] = []
    modalities: dict[str, ModalitySpec] = {}
    tasks: dict[str, TaskSpec] = {}
    stage_names: set[str] = set()
    lost = False  # an earlier stage could not be read: names it defines are unknown
    for i, (stage, bad) in enumerate(stages):
        at = f"stages[{i}]"
        if stage is None:
            lost = True
            continue
        if stage.name in stage_names:
            problems.append(f"{at}.name: stage name {stage.name!r} is used twice")
        stage_names.add(stage.name)
        for j, mod in enumerate(stage.add_modalities):
            if mod.name in modalities:
                problems.append(
                    f"{at}.add_modalities[{j}]: modality {mod.name!r} already exists; "
                    "train its component instead of adding it again"
                )
            if mod.init_from is not None and mod.init_from not in modalities and not lost:
                problems.append(
                    f"{at}.add_modalities[{j}].init_from: {mod.init_from!r} is not a modality "
                    f"added by an earlier stage (known: {_shown(modalities)})"
                )
        for j, task in enumerate(stage.add_tasks):
            if task.name in tasks:
                problems.append(f"{at}.add_tasks[{j}]: task {task.name!r} already exists")
        earlier = dict(tasks)
        modalities.update({m.name: m for m in stage.add_modalities})
        tasks.update({t.name: t for t in stage.add_tasks})
        known = {BACKBONE} | {modality_component(m) for m in modalities}
        known |= {task_component(t) for t in tasks}
        for j, component in enumerate(stage.train if _valid(bad, "train") else ()):
            if component not in known:
                if not lost:
                    problems.append(
                        f"{at}.train[{j}]: unknown component {component!r}; known so far: "
                        f"{_shown(known)}"
                    )
            elif component.startswith("task/") and tasks[component[5:]].head == "analytic":
                problems.append(
                    f"{at}.train[{j}]: {component!r} is an analytic head; it is fitted in "
                    "closed form by the stage that adds it, not trained by gradient"
                )
        for j, task_name in enumerate(stage.objectives if _valid(bad, "objectives") else ()):
            if task_name not in tasks and not lost:
                problems.append(f"{at}.objectives[{j}]: unknown task {task_name!r}")
        for j, mod_name in enumerate(stage.modalities if _valid(bad, "modalities") else ()):
            if mod_name not in modalities and not lost:
                problems.append(f"{at}.modalities[{j}]: unknown modality {mod_name!r}")
        if not modalities and not lost and _valid(bad, "add_modalities"):
            problems.append(f"{at}: no modality exists yet; add one with add_modalities")
        if not stage.objective_tasks and _valid(bad, "objectives", "add_tasks"):
            problems.append(f"{at}: the stage has no objective; add a task or set objectives")
        analytic = [t.name for t in stage.add_tasks if t.head == "analytic"]
        if analytic and len(analytic) != len(stage.add_tasks) and _valid(bad, "add_tasks"):
            problems.append(
                f"{at}.add_tasks: analytic heads {analytic} must be added in a stage of their own"
            )
        if (
            analytic
            and (stage.train or stage.rounds != 1 or stage.privacy.mode == "local")
            and _valid(bad, "add_tasks", "train", "rounds", "privacy")
        ):
            problems.append(
                f"{at}: an analytic stage sends statistics once: set rounds = 1, leave `train` "
                "empty and use privacy mode 'none' or 'central'"
            )
        if (
            stage.secure_aggregation
            and stage.privacy.mode == "central"
            and _valid(bad, "secure_aggregation", "privacy")
        ):
            problems.append(
                f"{at}: central DP needs the server to clip individual updates, which secure "
                "aggregation hides; use privacy mode 'local' with secure aggregation"
            )
        if (
            stage.secure_aggregation
            and stage.min_sites < stage.secagg.num_shares
            and _valid(bad, "secure_aggregation", "min_sites", "secagg")
        ):
            problems.append(
                f"{at}.min_sites: secure aggregation with num_shares = {stage.secagg.num_shares}"
                f" needs min_sites >= {stage.secagg.num_shares}"
            )
        reads = ("regularisers", "train", "add_modalities", "add_tasks", "objectives", "modalities")
        if not lost and _valid(bad, *reads):
            problems.extend(_forgetting_problems(at, stage, earlier, modalities))
    return problems


def _stage_routes(stage: StageSpec, known: Iterable[str]) -> tuple[str, ...]:
    """Modalities a stage trains on: ``modalities``, else those it adds, else all ``known``."""
    if stage.modalities:
        return stage.modalities
    if stage.add_modalities:
        return tuple(m.name for m in stage.add_modalities)
    return tuple(known)


def _self_supervised_problems(
    data: DataSpec | None,
    data_bad: frozenset[str],
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
) -> list[str]:
    """Reconstruction tasks that cannot run: blocks that do not tile the patch, more
    ``channels`` than a training route has inputs, or a stage that trains only the decoder."""
    problems: list[str] = []
    patch = data.patch_size if data is not None and _valid(data_bad, "patch_size") else None
    modalities: dict[str, ModalitySpec] = {}
    tasks: dict[str, tuple[str, TaskSpec]] = {}
    for i, (stage, bad) in enumerate(stages):
        if stage is None:
            return problems
        modalities.update({m.name: m for m in stage.add_modalities})
        for j, task in enumerate(stage.add_tasks):
            at = f"stages[{i}].add_tasks[{j}]"
            tasks[task.name] = (at, task)
            if task.kind == "reconstruction" and patch is not None:
                uneven = [size for size in patch if size % task.mask_size]
                if uneven:
                    problems.append(
                        f"{at}.mask_size: blocks of {task.mask_size} voxels do not tile the "
                        f"patch {list(patch)} (sizes {uneven}); use a divisor of every "
                        "data.patch_size entry"
                    )
        if not _valid(bad, "objectives", "add_tasks", "modalities", "add_modalities", "train"):
            continue
        objectives = [tasks[t] for t in stage.objective_tasks if t in tasks]
        reconstruction = [(at, t) for at, t in objectives if t.kind == "reconstruction"]
        if not reconstruction:
            continue
        routes = _stage_routes(stage, modalities)
        for at, task in reconstruction:
            short = [
                f"{m} ({len(modalities[m].input_keys)})"
                for m in routes
                if m in modalities and len(modalities[m].input_keys) < task.channels
            ]
            if short:
                problems.append(
                    f"{at}.channels: {task.channels} channel(s) to reconstruct, but the stage's "
                    f"route(s) {short} have fewer inputs; lower channels"
                )
        encoder = [
            c
            for c in stage.trained_components
            if c == BACKBONE
            or c.startswith("modality/")
            or (c.startswith("task/") and c[5:] in tasks and tasks[c[5:]][1].lora_rank > 0)
        ]
        if not encoder:
            names = [t.name for _, t in reconstruction]
            problems.append(
                f"stages[{i}].train: the self-supervised task(s) {names} train only their "
                "decoder, so the encoder learns nothing; add 'backbone' (and the modality) "
                "to train"
            )
    return problems


def _decoder_lora_problems(stages: Sequence[tuple[StageSpec | None, frozenset[str]]]) -> list[str]:
    """``decoder_lora`` entries naming a task that is not an earlier segmentation task."""
    problems: list[str] = []
    tasks: dict[str, TaskSpec] = {}
    for i, (stage, bad) in enumerate(stages):
        if stage is None:
            return problems
        if _valid(bad, "add_modalities"):
            for j, modality in enumerate(stage.add_modalities):
                for task in modality.decoder_lora:
                    at = f"stages[{i}].add_modalities[{j}].decoder_lora.{task}"
                    if task not in tasks:
                        problems.append(
                            f"{at}: no task {task!r} was added by an earlier stage (known: "
                            f"{_shown(tasks)}); decoder deltas adapt an existing decoder"
                        )
                    elif tasks[task].kind != "segmentation":
                        problems.append(
                            f"{at}: task {task!r} is {tasks[task].kind}; decoder deltas exist "
                            "only for segmentation decoders"
                        )
        tasks.update({t.name: t for t in stage.add_tasks})
    return problems


def _plan_order(problem: str) -> int:
    """Sort key: the plan's own fields first, then the stages in order."""
    match = re.match(r"stages\[(\d+)\]", problem)
    return int(match.group(1)) if match else -1


def validate_plan(data: Mapping[str, Any], *, source: str | None = None) -> Plan:
    """Parse a plan from plain data, reporting every problem at once.

    Field errors (of the plan and of every stage) and cross-stage errors (duplicate names,
    unknown tasks, modalities and components, regularisers without shared weights to
    protect...) are found in one pass: the cross-stage checks run on the valid parts of
    invalid stages too.

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
        With every problem found, each naming its field (``stages[1].privacy.delta``) and
        the fix, the plan's own fields first, then the stages in order.
    """
    problems: list[str] = []
    raw = dict(data)
    raw_stages = raw.pop("stages", None)
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append("stages: the plan needs at least one [[stages]] table")
        raw_stages = []
    adapter = TypeAdapter(StageSpec)
    stages: list[StageSpec] = []
    lenient: list[tuple[StageSpec | None, frozenset[str]]] = []
    for i, raw_stage in enumerate(raw_stages):
        try:
            stage = adapter.validate_python(raw_stage)
        except ValidationError as e:
            problems.extend(_format_validation_error(f"stages[{i}]", e))
            lenient.append(_lenient(StageSpec, raw_stage, _stage_repair(i)))
        else:
            stages.append(stage)
            lenient.append((stage, frozenset()))
    placeholder = StageSpec(name="placeholder", add_tasks=())
    plan: Plan | None
    try:
        plan = Plan.model_validate({**raw, "stages": stages or [placeholder]})
    except ValidationError as e:
        problems.extend(_format_validation_error("", e))
        plan = None
    model, model_bad = _lenient(ModelSpec, raw.get("model", {}))
    data_spec, data_bad = _lenient(DataSpec, raw.get("data", {}))
    problems += _header_problems(model, model_bad, data_spec, data_bad)
    problems += _cross_stage_problems(lenient)
    problems += _lora_problems(model, model_bad, lenient)
    problems += _self_supervised_problems(data_spec, data_bad, lenient)
    problems += _decoder_lora_problems(lenient)
    problems.sort(key=_plan_order)
    if problems or plan is None:
        raise PlanError(problems, source)
    return plan


def plan_warnings(plan: Plan) -> list[str]:
    """Settings that are valid but almost certainly not what the plan's author meant.

    A stage that trains only heads or modality adapters while no earlier stage has trained the
    shared encoder (``backbone``) fits them on the features of a *random, frozen* encoder:
    every component starts from a deterministic random initialisation and a stage trains only
    what its ``train`` lists (by default, the components it adds). The warning names the
    first such stage; it goes away when that stage lists ``backbone`` under ``train``, or
    when ``[model.pretrained]`` seeds the backbone from a file. A stage with ``patience`` but
    ``validate_every = 0`` never stops early: that is warned about too.

    Parameters
    ----------
    plan
        A validated plan.

    Returns
    -------
    list of str
        One line per warning, naming the field (``stages[0].train``) and the fix; empty if
        there is nothing to warn about.
    """
    warnings: list[str] = [
        f"stages[{i}].patience: stage {stage.name!r} sets patience = {stage.patience} but "
        "validate_every = 0, so it never validates and never stops early; set validate_every "
        ">= 1 or remove patience"
        for i, stage in enumerate(plan.stages)
        if stage.patience is not None and stage.validate_every == 0 and not stage.is_analytic
    ]
    pretrained = plan.model.pretrained
    if pretrained is not None and BACKBONE in (pretrained.components or (BACKBONE,)):
        return warnings  # the encoder starts from a pretrained file, not at random
    for i, stage in enumerate(plan.stages):
        trained = stage.trained_components
        if BACKBONE in trained:
            break
        later = any(BACKBONE in s.trained_components for s in plan.stages[i + 1 :])
        if stage.is_analytic:
            what = "fits its analytic head"
            fix = "train 'backbone' in a stage before it"
        else:
            what = f"trains {list(trained)}"
            fix = f"add 'backbone' to its `train`, e.g. train = {json.dumps([BACKBONE, *trained])}"
        warnings.append(
            f"stages[{i}].train: stage {stage.name!r} {what} on a random, frozen encoder: no "
            "earlier stage trains 'backbone' and this stage does not list it"
            + ("" if later else " (nor does any later stage)")
            + f"; {fix}"
        )
        break
    return warnings


_PLAN_NOT_A_TABLE = "the plan must be a table/object at the top level"
_PLAN_WORDING = DocumentWording(
    unreadable="cannot read the plan file: {reason}",
    invalid="not valid {extension}: {error}",
    not_mapping=_PLAN_NOT_A_TABLE,
    empty=_PLAN_NOT_A_TABLE,
)


def load_plan(path: str | Path) -> Plan:
    """Load and validate a TOML (or JSON) plan file.

    A ``.json`` file is read as JSON, any other as TOML.

    Raises
    ------
    PlanError
        If the file is missing, not valid TOML/JSON, or the plan is invalid (every problem).
    """
    path = Path(path)
    data = load_document(
        path,
        allowed=(".toml", ".json"),
        what="plan",
        error=PlanError,
        wording=_PLAN_WORDING,
        fallback="TOML",
    )
    return validate_plan(data, source=str(path))


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """JSON-able form of a plan (round-trips through :func:`validate_plan`)."""
    return plan.model_dump(mode="json")
