"""Which route serves a ``task@modality`` that no stage has trained.

A stage trains its objective tasks on its modalities' routes (``StageSpec.objective_tasks``
x the modalities it trains on). A later modality initialised from an earlier one
(``init_from``, e.g. PET-CT from CT) adds routes for every task, but the stage adding it
usually trains only some of them (the PET stage trains ``lesion-seg@pet``). Its other
routes, e.g. ``lesion-class@pet``, were never fitted: they follow whatever the new
modality's adapters learned for another task. Such a route is served instead by the route
of the modality it was initialised from, on the input channels the two share: a PET-CT case
sent to classification is classified from its CT channel exactly as a CT case would be.

The trained routes are recorded as the model grows (:meth:`UniconModel.grow`) and travel
in its config; a model whose config predates them (``None``) serves every route directly.
"""

from __future__ import annotations

import logging
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from unicon_model.schema import ModalitySpec, Plan, StageSpec

logger = logging.getLogger(__name__)

Route = tuple[str, str]
"""``(task, modality)``."""


def route_name(route: Route) -> str:
    """``task@modality``."""
    return f"{route[0]}@{route[1]}"


def parse_route(text: str) -> Route:
    """``(task, modality)`` of ``task@modality``.

    Raises
    ------
    ValueError
        If ``text`` is not of that form.
    """
    task, sep, modality = text.partition("@")
    if not sep or not task or not modality or "@" in modality:
        raise ValueError(f"route {text!r} is not of the form task@modality")
    return task, modality


def parse_trained_routes(value: object) -> set[Route] | None:
    """The ``trained_routes`` of a model config (``None``: absent, an older config).

    Raises
    ------
    TypeError
        If ``value`` is not a list of strings.
    ValueError
        If an entry is not of the form ``task@modality``.
    """
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise TypeError(
            f"trained_routes must be a list of task@modality, got {reprlib.repr(value)}"
        )
    return {parse_route(r) for r in value}


def stage_routes(stage: StageSpec, known_modalities: Iterable[str]) -> set[Route]:
    """The routes ``stage`` trains: its objective tasks on the modalities it trains on.

    Parameters
    ----------
    stage
        The stage.
    known_modalities
        The model's modalities once the stage has grown it.
    """
    modalities = stage.trained_modalities(known_modalities)
    return {(task, modality) for task in stage.objective_tasks for modality in modalities}


@dataclass(frozen=True)
class ServingRoute:
    """The route that serves a requested ``task@modality``.

    Attributes
    ----------
    modality
        The modality whose route runs (the requested one, or the one it was initialised
        from).
    channels
        Indices, in the requested modality's input channels, of the serving modality's
        inputs (in its channel order); ``None`` when the requested route serves itself.
    """

    modality: str
    channels: tuple[int, ...] | None = None


def serving_route(
    modalities: Mapping[str, ModalitySpec],
    trained: set[Route] | None,
    task: str,
    modality: str,
) -> ServingRoute:
    """The route serving ``task@modality``: itself, or a trained one it was initialised from.

    Follows ``init_from`` from ``modality`` until a modality on which ``task`` was trained
    and whose inputs ``modality`` also reads. Without one (or when ``trained`` is ``None``,
    a model whose config predates the record, or the route itself is trained) the route
    serves itself.

    Parameters
    ----------
    modalities
        The model's modality specs.
    trained
        The routes the model's stages trained, ``None`` if unknown.
    task, modality
        The requested route.
    """
    if trained is None or (task, modality) in trained:
        return ServingRoute(modality)
    # channels[i]: index, in the requested input, of the current modality's i-th input
    keys = modalities[modality].input_keys
    channels = tuple(range(len(keys)))
    current = modalities[modality]
    seen = {modality}
    while current.init_from is not None and current.init_from not in seen:
        source = modalities.get(current.init_from)
        if source is None or any(k not in current.input_keys for k in source.input_keys):
            break
        channels = tuple(channels[current.input_keys.index(k)] for k in source.input_keys)
        current = source
        seen.add(source.name)
        if (task, source.name) in trained:
            return ServingRoute(source.name, channels)
    return ServingRoute(modality)


def served_routes(plan: Plan) -> dict[str, str]:
    """The clinical routes of ``plan``'s final model that another route serves.

    Self-supervised tasks (a stage's training device, not a prediction) are left out.

    Returns
    -------
    dict
        ``task@modality`` -> ``task@serving-modality``, for every untrained route with a
        trained source (e.g. ``{"lesion-class@pet": "lesion-class@ct"}``).
    """
    trained: set[Route] = set()
    for index, stage in enumerate(plan.stages):
        trained |= stage_routes(stage, plan.modalities_until(index))
    modalities = plan.modalities_until(len(plan.stages) - 1)
    served = {}
    for task, spec in plan.tasks_until(len(plan.stages) - 1).items():
        if spec.self_supervised:
            continue
        for modality in modalities:
            route = serving_route(modalities, trained, task, modality)
            if route.channels is not None:
                served[route_name((task, modality))] = route_name((task, route.modality))
    return served
