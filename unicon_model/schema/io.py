"""Reading a plan file and writing a plan back to plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unicon_model.config_io import DocumentWording, load_document
from unicon_model.errors import PlanError
from unicon_model.schema.plan import Plan
from unicon_model.schema.validate import validate_plan

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
