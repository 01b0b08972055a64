"""One expansion stage and the settings it trains with (optimiser, regularisers, privacy,
secure aggregation)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Literal

from pydantic import Field, model_validator

from unicon_model.schema.base import (
    MAX_TIMEOUT_S,
    Name,
    _Frozen,
    modality_component,
    task_component,
)
from unicon_model.schema.modalities import ModalitySpec
from unicon_model.schema.tasks import TaskSpec


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
    update_analytic
        Analytic heads added by earlier stages whose statistics this stage *adds to*
        (incremental ridge, EvoSAM): one round in which only sites whose statistics are not
        in those heads yet take part (new hospitals); the server adds their summed
        statistics to the cumulative ones the heads keep and solves again, without
        revisiting old data. The result equals one solve on all the sites' data, as long as
        nothing the heads' features come from (the backbone, the modality adapters) was
        trained in between; ``plan check`` refuses it otherwise. Such a stage adds and
        trains nothing else. Default none (omitted from a dumped plan).
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
    update_analytic: tuple[Name, ...] = Field(default=(), exclude_if=lambda value: not value)

    @property
    def trained_components(self) -> tuple[str, ...]:
        """``train`` or, if empty, the components this stage adds."""
        if self.train:
            return self.train
        added = [modality_component(m.name) for m in self.add_modalities]
        return tuple(added + [task_component(t.name) for t in self.add_tasks])

    def trained_modalities(self, known: Iterable[str]) -> tuple[str, ...]:
        """Modalities whose data this stage trains on: ``modalities``, else those it adds,
        else all ``known`` (the model's modalities once the stage has grown it)."""
        if self.modalities:
            return self.modalities
        if self.add_modalities:
            return tuple(m.name for m in self.add_modalities)
        return tuple(known)

    @property
    def objective_tasks(self) -> tuple[str, ...]:
        """``objectives`` or, if empty, the tasks this stage adds (or updates analytically)."""
        return self.objectives or tuple(t.name for t in self.add_tasks) or self.update_analytic

    def fitted_heads(self, known: Mapping[str, TaskSpec]) -> tuple[TaskSpec, ...]:
        """The analytic heads an analytic stage fits: those it adds, then those it updates
        (``update_analytic``, looked up in ``known``, e.g. the model's task specs)."""
        return (*self.add_tasks, *(known[name] for name in self.update_analytic))

    @property
    def is_analytic(self) -> bool:
        """Whether the stage only fits analytic heads (one round of summed statistics): it
        adds only analytic heads, or updates earlier ones (``update_analytic``)."""
        if self.update_analytic:
            return True
        return bool(self.add_tasks) and all(t.head == "analytic" for t in self.add_tasks)
