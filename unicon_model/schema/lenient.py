"""Field errors as plan problems, and lenient parsing that lets cross-field checks run on
the valid parts of an invalid plan."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from unicon_model.config_io import pydantic_problems
from unicon_model.names import is_valid_name


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
