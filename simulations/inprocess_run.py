"""One plan run by the coordinator over in-process ClientApp nodes (no SuperLink, no Ray).

The in-process runs of the simulator (``unicon simulate --engine inprocess``, the baselines
of ``--compare`` and the system benchmarks) all go through :func:`run_in_process`: the real
:class:`server.coordinator.Coordinator` over :class:`simulations.inprocess.InProcessTransport`
with ``site_wait=0``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.registry import Registry
    from simulations.inprocess import InProcessTransport
    from unicon_model.schema import Plan

logger = logging.getLogger(__name__)


def run_in_process(
    plan: Plan,
    registry: Registry,
    site_dirs: Sequence[Path],
    state_root: Path,
    *,
    seed: int | None,
) -> InProcessTransport:
    """Run ``plan`` to its end over one in-process ClientApp node per site folder.

    Parameters
    ----------
    plan
        The validated plan.
    registry
        Where the coordinator commits versions and writes results and metrics.
    site_dirs
        Site folders, each with a manifest naming a distinct site.
    state_root
        Parent of the sites' state directories.
    seed
        Seeds NumPy's global random state for the run and restores it afterwards
        (:func:`simulations.inprocess.seeded_numpy`: Flower's SecAgg+ draws its stochastic
        rounding from it); ``None`` leaves the global state as it is.

    Returns
    -------
    InProcessTransport
        The transport the run used (what it sent, its SecAgg+ rounds).
    """
    # looked up at call time: tests replace the coordinator and the transport in their modules
    from server.coordinator import Coordinator
    from simulations.inprocess import InProcessTransport, seeded_numpy

    transport = InProcessTransport(list(site_dirs), state_root)
    seeded = seeded_numpy(seed) if seed is not None else contextlib.nullcontext()
    with seeded:
        Coordinator(plan, registry, transport, site_wait=0).run()
    return transport
