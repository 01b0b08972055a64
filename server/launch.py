"""The files and settings ``unicon plan launch`` prepares before it runs ``flwr run``.

The plan with its holdout sites, the launch folder, the ServerApp's run config and the
``flwr run`` connection.

The command itself (:func:`server.cli.plan_launch`) prints, exits and runs ``flwr run``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from server.run_config import RunConfig
from server.superlink import toml_table, write_connection
from unicon_model.schema import Plan, plan_to_dict, validate_plan


def with_holdout_sites(plan: Plan, sites: Sequence[str]) -> Plan:
    """``plan`` with ``[evaluation] holdout_sites`` set to ``sites`` (unchanged if empty).

    Raises
    ------
    PlanError
        If a name is not a valid site name or is repeated (every problem, naming
        ``evaluation.holdout_sites``).
    """
    if not sites:
        return plan
    raw = plan_to_dict(plan)
    raw["evaluation"] = {**(raw.get("evaluation") or {}), "holdout_sites": list(sites)}
    return validate_plan(raw, source="--holdout-site")


def launch_folder(registry: Path) -> tuple[Path, Path]:
    """The resolved registry (created if missing) and a new launch folder inside it."""
    registry = registry.resolve()
    registry.mkdir(parents=True, exist_ok=True)
    return registry, Path(tempfile.mkdtemp(prefix="launch-", dir=registry))


def write_plan_copy(work: Path, parsed: Plan) -> Path:
    """Write ``parsed`` as ``plan.json`` in ``work`` (the plan the ServerApp loads)."""
    plan = work / "plan.json"
    plan.write_text(json.dumps(plan_to_dict(parsed), indent=2))
    return plan


def launch_run_config(
    plan: Path, registry: Path, stage: str | None, site_wait: float, evaluate_timeout: float
) -> RunConfig:
    """The ServerApp's run config of a launch (every other key keeps its default).

    Raises
    ------
    RunConfigError
        If a number is not finite or below 0 (naming the key).
    """
    return RunConfig(
        plan=str(plan.resolve()),
        registry=str(registry),
        stage=stage or "",
        site_wait=float(site_wait),
        evaluate_timeout=float(evaluate_timeout),
    )


def write_run_config(work: Path, config: RunConfig) -> Path:
    """Write ``config`` as ``run-config.toml`` (every key) into ``work``; return its path."""
    config_path = work / "run-config.toml"
    config_path.write_text(toml_table(config.to_flower()))
    return config_path


def flwr_connection(
    registry: Path, superlink: str | None, root_certificates: Path | None, federation: str | None
) -> tuple[Path, str]:
    """``FLWR_HOME`` and the connection name for ``flwr run``."""
    if superlink is not None:
        flwr_home = registry / ".flwr"
        write_connection(flwr_home, "unicon", superlink, root_certificates)
        connection = "unicon"
    else:
        flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        connection = str(federation)
    return flwr_home, connection
