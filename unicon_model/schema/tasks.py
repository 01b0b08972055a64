"""A task head added by a stage: its kind, labels, covariates and the kind's primary metric."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator

from unicon_model.schema.base import MAX_PATCH_EDGE, Name, _Frozen

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
        features, fitted in one round from summed statistics; classification: on the pooled
        features; segmentation: per voxel, on every encoder level upsampled to the patch).
    l2
        Ridge penalty of an analytic head.
    analytic_random_features
        Analytic segmentation: fixed random features ``tanh(P f + c)`` (seeded, frozen)
        added to each voxel's pyramid features for nonlinearity. Default 0 (linear).
    analytic_features
        Analytic segmentation: parameter-free voxel features added to the pyramid's, any of
        ``context`` (each pyramid feature's mean over the voxel's 3×3×3 neighbourhood),
        ``intensity`` (the route's first input image and its 3×3×3 mean) and ``squares``
        (the square of every feature before it, so the linear head can select an
        intensity band); see :class:`unicon_model.analytic.AnalyticSegmentationHead`.
        Default none (the pyramid alone; omitted from a dumped plan, so digests of plans
        without it do not change). Each grows the statistics: ``d`` voxel features send
        ``(d + 1)²`` Gram values.
    class_balance
        Analytic segmentation: weight each voxel of the statistics by a fixed weight of its
        class, in the ratio ``foreground_prior`` (background) to ``1 - foreground_prior``
        (every label), so small lesions are not swamped by background (background and
        foreground weigh alike when the prior is right; see
        :func:`unicon_model.analytic.voxel_class_weights`). Fixed by the plan, never
        estimated from a site's data, so federated statistics stay equal to pooled ones.
        Default true; false: every voxel weighs alike.
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
    prompt
        Segmentation (neural head): ``box`` gives the decoder a box prompt, a mask that is
        1 inside the box and 0 outside, as one extra input channel of every decoder block
        (:mod:`unicon_model.prompts`); no box is the whole image. Default ``none``.
    prompt_jitter
        Box prompts: how far each face of the label's bounding box may move at training
        time, as a fraction of the box's size along that axis. Default 0.1; in [0, 0.5].
    prompt_drop
        Box prompts: the probability that a training sample gets no box (the whole image),
        so the head also learns the unprompted mode. Default 0.25; in [0, 1].
    decoder_width
        Segmentation (neural head): ``0`` (default, omitted from a dumped plan) gives a
        U-Net decoder whose blocks have the encoder levels' widths; ``c > 0`` a light one
        that projects every level to ``c`` channels (1×1) and keeps ``c`` in every block, a
        head of a fraction of the size (what a site uploads per round). At most 256.
    extends
        Segmentation: an earlier segmentation task whose labels this task adds to (a *label
        extension*, e.g. ``spine`` added to an ``organ-seg`` that knew liver and lungs).
        ``labels`` are background, then the new labels. Sites read them from the earlier
        task's masks, matched by name, so their manifests must declare the new labels there.
        The extension is a component of its own (its head, and deltas if ``lora_rank``), so
        the earlier head is never touched; the earlier task's prediction is the merged map
        (:mod:`unicon_model.label_extensions`), in which a new label claims only voxels that
        the earlier labels leave as background, so their predictions stay exactly as they
        were. Default: none (omitted from a dumped plan, so digests of plans without it do
        not change).
    """

    name: Name
    kind: TaskKind
    classes: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    covariate_scaling: dict[str, tuple[float, float]] = Field(default_factory=dict)
    head: Literal["neural", "analytic"] = "neural"
    l2: float = Field(default=1.0, gt=0)
    analytic_random_features: int = Field(default=0, ge=0, le=4096)
    analytic_features: tuple[Literal["context", "intensity", "squares"], ...] = Field(
        default=(), max_length=3, exclude_if=lambda value: not value
    )
    class_balance: bool = True
    foreground_prior: float = Field(default=0.01, gt=0, le=0.5)
    lora_rank: int = Field(default=0, ge=0, le=256)
    lora_levels: tuple[int, ...] = Field(default=(), max_length=8)
    mask_ratio: float = Field(default=0.6, gt=0, lt=1)
    mask_size: int = Field(default=4, ge=1, le=MAX_PATCH_EDGE)
    channels: int = Field(default=1, ge=1, le=64)
    prompt: Literal["none", "box"] = "none"
    prompt_jitter: float = Field(default=0.1, ge=0, le=0.5)
    prompt_drop: float = Field(default=0.25, ge=0, le=1)
    decoder_width: int = Field(default=0, ge=0, le=256, exclude_if=lambda value: value == 0)
    extends: Name | None = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def label_source(self) -> str:
        """The task whose labels a site reads for this one: ``extends``, else its own name."""
        return self.extends or self.name

    @property
    def prompted(self) -> bool:
        """Whether the task's head takes a box prompt (``prompt = "box"``)."""
        return self.prompt == "box"

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
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            problems.append(f"`labels` names {repeated} more than once; name each label once")
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
        if self.head == "analytic" and self.kind not in ("classification", "segmentation"):
            problems.append(
                "head = 'analytic' is only supported for classification and segmentation tasks"
            )
        if not (self.head == "analytic" and self.kind == "segmentation"):
            problems += [
                f"`{name}` is only for analytic segmentation heads (head = 'analytic', "
                "kind = 'segmentation')"
                for name in ("analytic_random_features", "analytic_features", "class_balance")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
        problems += self._prompt_problems()
        repeated = sorted(
            {f for f in self.analytic_features if self.analytic_features.count(f) > 1}
        )
        if repeated:
            problems.append(f"`analytic_features` lists {repeated} more than once")
        if self.decoder_width and (self.kind != "segmentation" or self.head != "neural"):
            problems.append(
                f"task {self.name!r}: `decoder_width` is only for neural segmentation heads; "
                "remove it"
            )
        if self.extends is not None and self.kind != "segmentation":
            problems.append(
                f"task {self.name!r}: `extends` adds labels to a segmentation task; a "
                f"{self.kind} task cannot extend one, remove `extends`"
            )
        if self.extends == self.name:
            problems.append(f"task {self.name!r}: `extends` names the task itself")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _prompt_problems(self) -> list[str]:
        """A box prompt needs a neural segmentation head; its options need a prompt."""
        if not self.prompted:
            return [
                f"task {self.name!r}: `{name}` is only for prompted tasks; set prompt = 'box' "
                f"or remove `{name}`"
                for name in ("prompt_jitter", "prompt_drop")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
        if self.kind != "segmentation":
            return [
                f"task {self.name!r}: prompt = 'box' is only for segmentation tasks, not "
                f"{self.kind}; remove `prompt`"
            ]
        if self.head == "analytic":
            return [
                f"task {self.name!r}: prompt = 'box' needs a neural segmentation head (an "
                "analytic head is solved on frozen features and takes no prompt); set "
                "head = 'neural' or remove `prompt`"
            ]
        return []

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
