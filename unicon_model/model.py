"""The growing UNICON model: a shared encoder, modality adapters and task heads.

Only the server decides growth, from stage specs, so every site builds the same component
names, shapes and (through seeded initialisation) the same initial values.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from unicon_model.adapters import ModalityAdapter
from unicon_model.analytic import AnalyticHead, AnalyticSegmentationHead, RidgeHead
from unicon_model.backbone import Encoder
from unicon_model.errors import ComponentError, GrowthError
from unicon_model.heads import (
    ClassificationHead,
    ReconstructionHead,
    SegmentationHead,
    SurvivalHead,
)
from unicon_model.layers import global_pool, pooled_size
from unicon_model.lora import DecoderDeltas, EncoderDeltas, attach, deltas_of
from unicon_model.routes import (
    Route,
    ServingRoute,
    parse_trained_routes,
    route_name,
    serving_route,
    stage_routes,
)
from unicon_model.schema import (
    BACKBONE,
    ModalitySpec,
    ModelSpec,
    Plan,
    StageSpec,
    TaskSpec,
    modality_component,
    task_component,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Initialise under a seed derived from the plan seed and the component name."""
    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
        yield


def _added_before(
    kind: str,
    spec: ModalitySpec | TaskSpec,
    known: Mapping[str, ModalitySpec | TaskSpec],
    *,
    show_known: bool = False,
) -> bool:
    """Whether ``spec`` (a ``kind``, ``modality`` or ``task``) is in ``known`` already.

    Raises
    ------
    GrowthError
        If ``known`` holds its name with a different spec (shown if ``show_known``): names
        cannot be reused.
    """
    if spec.name not in known:
        return False
    if known[spec.name] != spec:
        shown = f" ({known[spec.name]})" if show_known else ""
        raise GrowthError(
            f"{kind} {spec.name!r} already exists with a different spec{shown}; "
            f"{kind} names cannot be reused"
        )
    return True


class UniconModel(nn.Module):
    """A foundation model that grows modality adapters and task heads stage by stage.

    Parameters
    ----------
    spec
        Architecture of the encoder and defaults of the components.

    Examples
    --------
    >>> from unicon_model.schema import StageSpec, ModalitySpec, TaskSpec
    >>> model = UniconModel(ModelSpec(spatial_dims=2))
    >>> stage = StageSpec(name="s1", add_modalities=[ModalitySpec(name="ct")],
    ...     add_tasks=[TaskSpec(name="cls", kind="classification", classes=["a", "b"])])
    >>> model.grow(stage)
    ['modality/ct', 'task/cls']
    >>> model(torch.zeros(1, 1, 16, 16), modality="ct", task="cls").shape
    torch.Size([1, 2])
    """

    def __init__(self, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or ModelSpec()
        with _seeded(self.spec.seed, BACKBONE):
            self.backbone = Encoder(self.spec.spatial_dims, self.spec.widths, self.spec.norm)
        self.modalities = nn.ModuleDict()
        self.tasks = nn.ModuleDict()
        self.modality_specs: dict[str, ModalitySpec] = {}
        self.task_specs: dict[str, TaskSpec] = {}
        # routes (task, modality) the grown stages train; None: unknown (components added
        # one by one, or an older config), and then every route serves itself
        self.trained_routes: set[Route] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_plan(cls, plan: Plan, *, through_stage: int | None = None) -> UniconModel:
        """Build the model of ``plan`` grown by its stages ``0..through_stage`` (default all)."""
        last = len(plan.stages) - 1 if through_stage is None else through_stage
        if not -1 <= last < len(plan.stages):
            raise GrowthError(f"plan {plan.name!r} has no stage index {last}")
        model = cls(plan.model)
        for stage in plan.stages[: last + 1]:
            model.grow(stage)
        return model

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_config` rebuilds the architecture."""
        config: dict[str, Any] = {
            "model": self.spec.model_dump(mode="json"),
            "modalities": [m.model_dump(mode="json") for m in self.modality_specs.values()],
            "tasks": [t.model_dump(mode="json") for t in self.task_specs.values()],
        }
        if self.trained_routes is not None:
            config["trained_routes"] = sorted(map(route_name, self.trained_routes))
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UniconModel:
        """Rebuild a model (architecture and seeded initial values) from :meth:`config`."""
        try:
            model = cls(ModelSpec.model_validate(config["model"]))
            modalities = [ModalitySpec.model_validate(m) for m in config.get("modalities", [])]
            tasks = [TaskSpec.model_validate(t) for t in config.get("tasks", [])]
            model.trained_routes = parse_trained_routes(config.get("trained_routes"))
        except (KeyError, TypeError, ValueError) as e:
            raise GrowthError(f"invalid model config: {e}") from e
        by_name = {t.name: t for t in tasks}
        for modality in modalities:
            for name in modality.decoder_lora:  # the decoders it adapts come first
                if name in by_name:
                    model.add_task(by_name[name])
            model.add_modality(modality)
        for task in tasks:
            model.add_task(task)
        return model

    def grow(self, stage: StageSpec) -> list[str]:
        """Add the components ``stage`` declares; already present identical ones are kept.

        Also records the routes the stage trains (:attr:`trained_routes`), from which
        :meth:`serving_route` tells which route answers an untrained one.

        Returns
        -------
        list of str
            Names of the components actually added.

        Raises
        ------
        GrowthError
            If a component exists with a different spec, or ``init_from`` is unknown.
        """
        if self.trained_routes is None and not self.modality_specs and not self.task_specs:
            self.trained_routes = set()  # grown from empty: every stage is recorded
        added = [modality_component(m.name) for m in stage.add_modalities if self.add_modality(m)]
        added += [task_component(t.name) for t in stage.add_tasks if self.add_task(t)]
        if self.trained_routes is not None:
            self.trained_routes |= stage_routes(stage, self.modality_specs)
        if added:
            logger.info("stage %s grew %s", stage.name, added)
        return added

    def add_modality(self, spec: ModalitySpec) -> bool:
        """Add a modality adapter; return ``False`` if an identical one exists."""
        if _added_before("modality", spec, self.modality_specs, show_known=True):
            return False
        with _seeded(self.spec.seed, modality_component(spec.name)):
            adapter = ModalityAdapter(
                self.spec.spatial_dims,
                len(spec.input_keys),
                self.spec.widths,
                rank=self.spec.adapter_rank,
                norm=self.spec.norm,
            )
            self._attach_deltas(adapter, modality_component(spec.name), spec)
            self._attach_decoder_deltas(adapter, spec)
        if spec.init_from is not None:
            if spec.init_from not in self.modality_specs:
                raise GrowthError(
                    f"modality {spec.name!r}: init_from {spec.init_from!r} does not exist; "
                    f"known modalities: {sorted(self.modality_specs)}"
                )
            source_keys = self.modality_specs[spec.init_from].input_keys
            channel_map = [
                source_keys.index(k) if k in source_keys else None for k in spec.input_keys
            ]
            source = self.modalities[spec.init_from]
            assert isinstance(source, ModalityAdapter)
            adapter.initialise_from(source, channel_map)
        self.modalities[spec.name] = adapter.to(self._device())
        self.modality_specs[spec.name] = spec
        return True

    def add_task(self, spec: TaskSpec) -> bool:
        """Add a task head; return ``False`` if an identical one exists."""
        if _added_before("task", spec, self.task_specs):
            return False
        widths, hidden = self.spec.widths, self.spec.head_hidden
        head: nn.Module
        with _seeded(self.spec.seed, task_component(spec.name)):
            if spec.head == "analytic" and spec.kind == "segmentation":
                head = AnalyticSegmentationHead(
                    self.spec.spatial_dims,
                    widths,
                    spec.num_outputs,
                    random_features=spec.analytic_random_features,
                    extras=spec.analytic_features,
                )
            elif spec.head == "analytic":
                head = AnalyticHead(pooled_size(widths), spec.num_outputs)
            elif spec.kind == "classification":
                head = ClassificationHead(widths, spec.num_outputs, hidden=hidden)
            elif spec.kind == "survival":
                head = SurvivalHead(widths, len(spec.covariates), hidden=hidden)
            elif spec.kind == "reconstruction":
                head = ReconstructionHead(
                    self.spec.spatial_dims, widths, spec.num_outputs, norm=self.spec.norm
                )
            else:
                head = SegmentationHead(
                    self.spec.spatial_dims,
                    widths,
                    spec.num_outputs,
                    norm=self.spec.norm,
                    foreground_prior=spec.foreground_prior,
                    prompted=spec.prompted,
                    decoder_width=spec.decoder_width,
                )
            # created after the head, so the head's seeded initial values do not depend on it
            self._attach_deltas(head, task_component(spec.name), spec)
        self.tasks[spec.name] = head.to(self._device())
        self.task_specs[spec.name] = spec
        return True

    def _attach_deltas(
        self, owner: nn.Module, component: str, spec: ModalitySpec | TaskSpec
    ) -> None:
        """Give ``owner`` the encoder deltas (LoRA) ``spec`` asks for."""
        if spec.lora_rank == 0:
            return
        if isinstance(owner, RidgeHead):
            raise GrowthError(
                f"{component}: an analytic head is fitted on frozen features and cannot train "
                "encoder deltas; set lora_rank = 0"
            )
        try:
            attach(owner, self.backbone.levels, spec.lora_rank, spec.lora_levels)
        except ValueError as e:
            raise GrowthError(f"{component}: {e} (model.widths = {list(self.spec.widths)})") from e

    def _attach_decoder_deltas(self, adapter: ModalityAdapter, spec: ModalitySpec) -> None:
        """Give ``adapter`` the decoder deltas ``spec.decoder_lora`` asks for."""
        if not spec.decoder_lora:
            return
        decoders = nn.ModuleDict()
        for task, rank in spec.decoder_lora.items():
            head = self.tasks[task] if task in self.task_specs else None
            if not isinstance(head, SegmentationHead):
                what = (
                    "does not exist"
                    if head is None
                    else f"is {self.task_specs[task].kind} ({self.task_specs[task].head} head)"
                )
                raise GrowthError(
                    f"modality {spec.name!r}: decoder_lora names task {task!r}, which {what}; "
                    f"decoder deltas adapt an existing segmentation decoder (tasks: "
                    f"{sorted(self.task_specs)})"
                )
            decoders[task] = DecoderDeltas(head.adaptable_convolutions(), rank)
        adapter.decoder_lora = decoders

    def decoder_deltas(self, modality: str, task: str) -> DecoderDeltas | None:
        """The decoder deltas modality ``modality`` owns for ``task``, if any."""
        decoders = getattr(self.modalities[modality], "decoder_lora", None)
        if isinstance(decoders, nn.ModuleDict) and task in decoders:
            deltas = decoders[task]
            assert isinstance(deltas, DecoderDeltas)
            return deltas
        return None

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def component_names(self) -> list[str]:
        """Every component of the model, backbone first."""
        return (
            [BACKBONE]
            + [modality_component(m) for m in self.modality_specs]
            + [task_component(t) for t in self.task_specs]
        )

    # ------------------------------------------------------------------ forward
    def encode(self, x: Tensor, *, modality: str, task: str | None = None) -> list[Tensor]:
        """Feature pyramid of ``x`` through ``modality``'s stem and adapters.

        Parameters
        ----------
        x
            ``(B, C, *spatial)`` with ``C`` = the modality's number of inputs and each spatial
            size divisible by the encoder's downsampling factor.
        modality
            A modality added to the model; its encoder deltas (LoRA), if any, apply.
        task
            The route's task: its encoder deltas, if any, apply too. ``None``: only the
            modality's.
        """
        self._check_known(modality=modality)
        adapter = self.modalities[modality]
        factor = self.backbone.downsampling_factor
        self._check_channels(x, modality)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {factor}; "
                "crop or pad the patch (plan data.patch_size)"
            )
        features = self.backbone(adapter(x), adapter.adapters, self.route_deltas(modality, task))
        return cast(list[Tensor], features)  # nn.Module calls are typed Any

    def serving_route(self, modality: str, task: str) -> ServingRoute:
        """The route :meth:`forward` runs for ``task@modality``.

        The route itself if a stage trained it (or the model does not know which stages
        trained what); otherwise the trained route of the modality ``modality`` was
        initialised from, on the input channels both read (see :mod:`unicon_model.routes`).

        Raises
        ------
        ComponentError
            If ``modality`` or ``task`` is not part of the model.
        """
        self._check_known(modality=modality, task=task)
        return serving_route(self.modality_specs, self.trained_routes, task, modality)

    def _check_known(self, *, modality: str | None = None, task: str | None = None) -> None:
        """Refuse a modality or task the model does not have (``None``: not checked)."""
        if modality is not None and modality not in self.modality_specs:
            raise ComponentError(
                f"unknown modality {modality!r}; the model has {sorted(self.modality_specs)}"
            )
        if task is not None and task not in self.task_specs:
            raise ComponentError(f"unknown task {task!r}; the model has {sorted(self.task_specs)}")

    def _check_channels(self, x: Tensor, modality: str) -> None:
        """Refuse an input whose channel count is not ``modality``'s."""
        expected = len(self.modality_specs[modality].input_keys)
        if x.ndim != self.spec.spatial_dims + 2 or x.shape[1] != expected:
            raise ValueError(
                f"modality {modality!r} expects input (B, {expected}, "
                f"{', '.join(['size'] * self.spec.spatial_dims)}), got {tuple(x.shape)}"
            )

    def route_deltas(self, modality: str, task: str | None = None) -> list[EncoderDeltas]:
        """The encoder deltas of the route ``task@modality``: the modality's, then the task's.

        Raises
        ------
        ComponentError
            If ``modality`` or ``task`` is not part of the model.
        """
        self._check_known(modality=modality, task=task)
        owners = [self.modalities[modality]]
        if task is not None:
            owners.append(self.tasks[task])
        return [d for d in map(deltas_of, owners) if d is not None]

    def forward(
        self,
        x: Tensor,
        *,
        modality: str,
        task: str,
        clinical: Tensor | None = None,
        prompt: Tensor | None = None,
    ) -> Tensor:
        """Route ``x`` through ``modality``'s adapter, the encoder and ``task``'s head.

        A route no stage trained is served by the trained route of the modality ``modality``
        was initialised from, on the channels both read (:meth:`serving_route`).

        ``prompt``: the box mask ``(B, 1, *spatial)`` of a task with ``prompt = "box"``
        (:mod:`unicon_model.prompts`); ``None`` gives such a task the whole image (its
        unprompted mode). Refused for a task without prompting.

        Returns
        -------
        Tensor
            Class logits ``(B, C)``, risk scores ``(B,)``, segmentation logits
            ``(B, L, *spatial)`` or reconstructed channels ``(B, channels, *spatial)``.
        """
        self._check_known(task=task)
        if prompt is not None and not self.task_specs[task].prompted:
            raise ComponentError(
                f"task {task!r} takes no box prompt (its plan sets no prompt = 'box')"
            )
        serving = self.serving_route(modality, task)
        if serving.channels is not None:
            self._check_channels(x, modality)
            x, modality = x[:, list(serving.channels)], serving.modality
        features = self.encode(x, modality=modality, task=task)
        head = self.tasks[task]
        # nn.Module calls are typed Any
        if isinstance(head, AnalyticHead):
            return cast(Tensor, head(global_pool(features)))
        if isinstance(head, AnalyticSegmentationHead):
            return cast(Tensor, head(features, clinical, x))
        if isinstance(head, SegmentationHead):
            deltas = self.decoder_deltas(modality, task)
            return cast(Tensor, head(features, clinical, deltas, prompt))
        return cast(Tensor, head(features, clinical))

    def pooled_features(self, x: Tensor, *, modality: str, task: str | None = None) -> Tensor:
        """Pooled multi-scale features ``(B, pooled_size(widths))`` (analytic heads' input).

        Uses the deltas of ``modality`` and, if given, of ``task`` (analytic heads have none,
        so their features are the same with or without ``task``).
        """
        return global_pool(self.encode(x, modality=modality, task=task))
