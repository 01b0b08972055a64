"""Run a plan on Flower's simulation engine with the real ServerApp and ClientApp.

A private SuperLink in simulation mode is started for the run (own ``FLWR_HOME``, free port,
stopped by pid afterwards); ``flwr run`` submits the app with the plan, the registry and the
site folders in its run config, and ``num-supernodes`` equal to the number of sites. Each
simulated SuperNode ``i`` serves site folder ``i`` (``partition-id``), with its state under
``state_root``.

Backend (:class:`BackendSettings`): each ClientApp runs in a Ray actor; Ray starts as many
actors as fit ``runtime_cpus / cpus_per_site`` (and ``runtime_gpus / gpus_per_site``), and
the virtual sites take turns on them, so memory grows with the actors, not with the sites.
The default on this kind of machine (2 cores) is one CPU per ClientApp, i.e. two actors.
On a bigger machine give each ClientApp the cores its training uses (``cpus_per_site=4`` on
32 cores: 8 sites train at once) and a GPU fraction (``gpus_per_site=0.25``: four sites share
a GPU). On a Ray cluster, start the SuperLink with ``RAY_ADDRESS=<head>:6379`` in its
environment and leave ``runtime_cpus``/``runtime_gpus`` unset (``ray.init`` refuses them when
it joins an existing cluster); the cluster's resources then decide the number of actors.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import CoordinatorError
from server.run_config import RunConfig
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
class BackendSettings:
    """Resources of Flower's Ray backend (``flwr run --federation-config``).

    Attributes
    ----------
    cpus_per_site
        CPUs reserved for one ClientApp (``client-resources-num-cpus``, an integer >= 1).
        Default 2, Flower's own default: one actor on a 2-core machine, whose sites then
        train with the same thread count as the in-process engine and give the same updates
        (tested to 1e-3 of the update). Two actors of one CPU each (``cpus_per_site=1``)
        serve sites in parallel, but train each with one thread; on 2026-12-02 that changed
        the first stage's update by 0.24 of its size against the in-process run (different
        float summation order, amplified over the local steps), so it is opt-in.
    gpus_per_site
        GPU fraction reserved for one ClientApp (``client-resources-num-gpus``).
    runtime_cpus, runtime_gpus
        CPUs/GPUs Ray may use in all (``init-args-num-cpus``/``-gpus``); ``None`` lets Ray
        take the machine's (and is required when joining a Ray cluster).
    """

    cpus_per_site: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    gpus_per_site: float = 0.0
    runtime_cpus: int | None = field(default_factory=lambda: os.cpu_count() or 1)
    runtime_gpus: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.cpus_per_site < 1:
            problems.append(f"cpus_per_site must be >= 1, got {self.cpus_per_site}")
        if not 0.0 <= self.gpus_per_site <= 1.0:
            problems.append(f"gpus_per_site must be in [0, 1], got {self.gpus_per_site}")
        if self.runtime_cpus is not None and self.runtime_cpus < self.cpus_per_site:
            problems.append(
                f"runtime_cpus {self.runtime_cpus} is below cpus_per_site {self.cpus_per_site}: "
                "no ClientApp could start"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def actors(self) -> int | None:
        """ClientApps that run at once (``None`` when Ray's resources decide)."""
        if self.runtime_cpus is None:
            return None
        return max(self.runtime_cpus // self.cpus_per_site, 1)

    def federation_config(self, sites: int) -> str:
        """The ``--federation-config`` value for ``sites`` virtual SuperNodes."""
        values: dict[str, str] = {
            "num-supernodes": str(sites),
            "client-resources-num-cpus": str(self.cpus_per_site),
            "client-resources-num-gpus": f"{self.gpus_per_site:g}",
        }
        if self.runtime_cpus is not None:
            values["init-args-num-cpus"] = str(self.runtime_cpus)
        if self.runtime_gpus is not None:
            values["init-args-num-gpus"] = str(self.runtime_gpus)
        return " ".join(f"{k}={v}" for k, v in values.items())


MEMORY_BASE_MIB = {"flower": 1400.0, "inprocess": 700.0}
"""Memory of a run before its sites: SuperLink, ServerApp and Ray (flower), or this process
(2026-12-02, 2 actors: 2,261 MiB PSS of the process tree at 10 sites, 2,352 MiB at 100)."""
MEMORY_PER_ACTOR_MIB = 450.0
"""Memory of one Ray actor running the ClientApp (torch, MONAI, Flower imported)."""
MEMORY_PER_SITE_MIB = 2.0
"""Memory one more (virtual) site adds with the tiny model of ``--quick``: twice the 1.0 MiB
measured on Flower's engine (README, "Where the time goes"); a bigger model adds its size."""


def memory_estimate_mib(
    sites: int, *, engine: str = "flower", backend: BackendSettings | None = None
) -> float:
    """Estimated peak memory (MiB) of a ``--quick`` simulation over ``sites`` sites."""
    base = MEMORY_BASE_MIB.get(engine, MEMORY_BASE_MIB["flower"])
    if engine == "flower":
        actors = (backend or BackendSettings()).actors or 1
        base += MEMORY_PER_ACTOR_MIB * min(actors, sites)
    return base + MEMORY_PER_SITE_MIB * sites


def available_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """``MemAvailable`` of this machine in MiB (``None`` where the kernel does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_problem(
    sites: int,
    *,
    engine: str = "flower",
    backend: BackendSettings | None = None,
    available_mib: float | None = None,
    fraction: float = 0.8,
) -> str:
    """Why ``sites`` sites would not fit in memory (empty if they fit, or if unknown).

    A run may take ``fraction`` of the available memory; the estimate is
    :func:`memory_estimate_mib`.
    """
    available = available_memory_mib() if available_mib is None else available_mib
    if available is None:
        return ""
    needed = memory_estimate_mib(sites, engine=engine, backend=backend)
    if needed <= fraction * available:
        return ""
    per_site = MEMORY_PER_SITE_MIB
    base = needed - per_site * sites
    most = max(int((fraction * available - base) // per_site), 0)
    return (
        f"{sites} sites need about {needed:,.0f} MiB on the {engine} engine ({base:,.0f} MiB "
        f"for the runtime + {per_site:g} MiB per site), more than {fraction:.0%} of the "
        f"{available:,.0f} MiB available; at most about {most} sites fit here"
    )


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
    backend: BackendSettings | None = None,
) -> SimulationRun:
    """Run ``plan`` over ``site_dirs`` on Flower's simulation engine; wait until it ends.

    ``backend`` sets the Ray backend's resources (default :class:`BackendSettings`: one CPU
    per ClientApp, every core of the machine).

    Raises
    ------
    CoordinatorError
        When ``flwr run`` fails or the SuperLink does not start.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    run_config = RunConfig(
        plan=str(Path(plan).resolve()),
        registry=str(Path(registry).resolve()),
        stage=stage or "",
        site_wait=float(site_wait),
        site_dirs=tuple(str(Path(d).resolve()) for d in site_dirs),
        state_root=str(Path(state_root).resolve()),
    )
    config_path = work_dir / "run-config.toml"
    config_path.write_text(toml_table(run_config.to_flower()))
    flwr_home = work_dir / "flwr-home"
    started = time.perf_counter()
    with SuperLink(work_dir / "superlink", simulation=True) as link:
        write_connection(flwr_home, "simulation", link.address)
        command = flwr_run_command(
            app=project_root(),
            connection="simulation",
            run_config=config_path,
        )
        settings = backend or BackendSettings()
        # added here: flwr_run_command's mapping takes integers only (no GPU fraction)
        at = len(command) - (command[-1] == "--stream")
        command[at:at] = ["--federation-config", settings.federation_config(len(site_dirs))]
        logger.info("simulation backend: %s", command[at + 1])
        code = flwr_run(command, flwr_home=flwr_home, timeout=timeout, quiet=quiet)
    wall = time.perf_counter() - started
    if code != 0:
        raise CoordinatorError(
            f"flwr run exited with code {code}; see {work_dir / 'superlink' / 'superlink.log'}"
        )
    return SimulationRun(Path(registry), Path(state_root), wall, code)
