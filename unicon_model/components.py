"""Named components of the growing model and the parameter subsets that travel.

Component names are ``backbone``, ``modality/<name>`` and ``task/<name>``; in the model's
``state_dict`` they own the key prefixes ``backbone.``, ``modalities.<name>.`` and
``tasks.<name>.``. A stage trains a named subset of components, and only that subset is
sent back by the sites; these helpers select, check and load such subsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from unicon_model.errors import ComponentError
from unicon_model.schema import BACKBONE

_PREFIXES = {"modality": "modalities", "task": "tasks"}
_COMPONENTS = {v: k for k, v in _PREFIXES.items()}


def key_prefix(component: str) -> str:
    """State-dict key prefix of ``component`` (``modality/pet`` -> ``modalities.pet.``)."""
    if component == BACKBONE:
        return "backbone."
    kind, _, name = component.partition("/")
    if kind not in _PREFIXES or not name:
        raise ComponentError(
            f"unknown component name {component!r}; expected 'backbone', 'modality/<name>' "
            "or 'task/<name>'"
        )
    return f"{_PREFIXES[kind]}.{name}."


def component_of_key(key: str) -> str:
    """Component owning a state-dict key (``tasks.survival.mlp.0.weight`` -> ``task/survival``)."""
    head, _, rest = key.partition(".")
    if head == "backbone":
        return BACKBONE
    if head in _COMPONENTS and rest:
        return f"{_COMPONENTS[head]}/{rest.partition('.')[0]}"
    raise ComponentError(f"state-dict key {key!r} belongs to no component")


def split_by_component(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group a state dict by component name."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        grouped.setdefault(component_of_key(key), {})[key] = value
    return grouped


def select_state(model: nn.Module, components: Iterable[str]) -> dict[str, Tensor]:
    """The state-dict entries (parameters and buffers) of ``components``, detached.

    Raises
    ------
    ComponentError
        If a component does not exist in the model.
    """
    wanted = list(components)
    state = model.state_dict()
    present = {component_of_key(k) for k in state}
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ComponentError(
            f"the model has no component(s) {missing}; it has {sorted(present)}. "
            "Grow the model with the stage spec that adds them first."
        )
    prefixes = tuple(key_prefix(c) for c in wanted)
    return {k: v.detach() for k, v in state.items() if k.startswith(prefixes)}


def check_state(
    model: nn.Module, state: Mapping[str, Tensor], *, components: Iterable[str] | None = None
) -> list[str]:
    """Every problem with loading ``state`` into ``model``: unknown keys, shapes, dtypes, gaps.

    Parameters
    ----------
    model
        The target model.
    state
        Tensors keyed by state-dict key.
    components
        If given, ``state`` must hold exactly these components (all their keys, no others).

    Returns
    -------
    list of str
        Problems found (empty when ``state`` can be loaded).
    """
    own = model.state_dict()
    problems = []
    for key, value in state.items():
        if key not in own:
            problems.append(f"{key}: not a key of the model")
        elif tuple(value.shape) != tuple(own[key].shape):
            problems.append(
                f"{key}: shape {tuple(value.shape)} but the model has {tuple(own[key].shape)}"
            )
        elif value.dtype != own[key].dtype and not (
            value.is_floating_point() and own[key].is_floating_point()
        ):
            problems.append(f"{key}: dtype {value.dtype} but the model has {own[key].dtype}")
    if components is not None:
        wanted = list(components)
        prefixes = tuple(key_prefix(c) for c in wanted)
        missing = [k for k in own if k.startswith(prefixes) and k not in state]
        if missing:
            problems.append(f"missing {len(missing)} key(s) of {wanted}, e.g. {missing[:3]}")
        extra = [k for k in state if k in own and not k.startswith(prefixes)]
        if extra:
            problems.append(f"{len(extra)} key(s) outside {wanted}, e.g. {extra[:3]}")
    return problems


def load_state(
    model: nn.Module, state: Mapping[str, Tensor], *, components: Iterable[str] | None = None
) -> None:
    """Load a subset of the model's state after checking it (see :func:`check_state`).

    Raises
    ------
    ComponentError
        Listing every problem; the model is left unchanged.
    """
    problems = check_state(model, state, components=components)
    if problems:
        raise ComponentError("cannot load the tensors:\n  - " + "\n  - ".join(problems))
    merged = model.state_dict()
    for key, value in state.items():
        merged[key] = value.to(dtype=merged[key].dtype, device=merged[key].device)
    model.load_state_dict(merged)


def set_trainable(model: nn.Module, components: Iterable[str]) -> list[str]:
    """Make only ``components`` trainable (``requires_grad``); freeze everything else.

    Returns
    -------
    list of str
        Names of the trainable parameters.
    """
    prefixes = tuple(key_prefix(c) for c in components)
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def component_sizes(model: nn.Module) -> dict[str, int]:
    """Number of values in each component (parameters and buffers)."""
    sizes: dict[str, int] = {}
    for key, value in model.state_dict().items():
        component = component_of_key(key)
        sizes[component] = sizes.get(component, 0) + value.numel()
    return sizes
