"""Run a plan on Flower's simulation engine with the real ServerApp and ClientApp.

A private SuperLink in simulation mode is started for the run (own ``FLWR_HOME``, free port,
stopped by pid afterwards); ``flwr run`` submits the app with the plan, the registry and the
site folders in its run config, and ``num-supernodes`` equal to the number of sites. Each
simulated SuperNode ``i`` serves site folder ``i`` (``partition-id``), with its state under
``state_root``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.errors import CoordinatorError
from server.superlink import (
    SuperLink,
    flwr_run,
    flwr_run_command,
    project_root,
    toml_table,
    write_connection,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationRun:
    """Where a simulation run left its outputs."""

    registry: Path
    state_root: Path
    wall_s: float
    exit_code: int


def run_plan_in_simulation(
    plan: Path,
    site_dirs: Sequence[Path],
    *,
    registry: Path,
    state_root: Path,
    work_dir: Path,
    stage: str | None = None,
    site_wait: float = 60.0,
    timeout: float | None = None,
    quiet: bool = False,
) -> SimulationRun:
    """Run ``plan`` over ``site_dirs`` on Flower's simulation engine; wait until it ends.

    Raises
    ------
    CoordinatorError
        When ``flwr run`` fails or the SuperLink does not start.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    run_config: dict[str, str | int | float | bool] = {
        "plan": str(Path(plan).resolve()),
        "registry": str(Path(registry).resolve()),
        "stage": stage or "",
        "site-wait": float(site_wait),
        "site-dirs": json.dumps([str(Path(d).resolve()) for d in site_dirs]),
        "state-root": str(Path(state_root).resolve()),
    }
    config_path = work_dir / "run-config.toml"
    config_path.write_text(toml_table(run_config))
    flwr_home = work_dir / "flwr-home"
    started = time.perf_counter()
    with SuperLink(work_dir / "superlink", simulation=True) as link:
        write_connection(flwr_home, "simulation", link.address)
        command = flwr_run_command(
            app=project_root(),
            connection="simulation",
            run_config=config_path,
            federation_config={"num-supernodes": len(site_dirs)},
        )
        code = flwr_run(command, flwr_home=flwr_home, timeout=timeout, quiet=quiet)
    wall = time.perf_counter() - started
    if code != 0:
        raise CoordinatorError(
            f"flwr run exited with code {code}; see {work_dir / 'superlink' / 'superlink.log'}"
        )
    return SimulationRun(Path(registry), Path(state_root), wall, code)
