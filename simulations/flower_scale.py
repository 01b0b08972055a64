"""Scale on Flower's simulation engine (``python -m simulations.bench --only flower-scale``).

For each site count: generate that many tiny hospitals (16³, a few cases each), run one
three-round stage of the tiny model on Flower's simulation engine (a private SuperLink,
Ray actors, the real ServerApp and ClientApp) and measure

- the first round and the steady-state seconds per round (round 2 on, from the round
  records), and the steady-state overhead (:func:`simulations.bench.steady_state`);
- the peak memory of the whole process tree (SuperLink, ServerApp, Ray and its actors),
  sampled every half second from ``/proc``: summed RSS (counts shared pages once per
  process: an upper bound) and summed PSS (shared pages split between their processes);
- the memory each extra virtual site adds: the slope of peak PSS over the site counts.

Not part of ``make test`` or ``make bench``: minutes per site count on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _children(proc: Path = Path("/proc")) -> dict[int, list[int]]:
    """Parent pid -> child pids of every process readable in ``proc``."""
    tree: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ")"
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(root: int, proc: Path = Path("/proc")) -> list[int]:
    """``root`` and all its descendants."""
    tree = _children(proc)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def tree_memory_mib(root: int, proc: Path = Path("/proc")) -> tuple[float, float]:
    """(summed RSS, summed PSS) in MiB of ``root``'s process tree (PSS = RSS if unknown)."""
    rss = pss = 0.0
    for pid in process_tree(root, proc):
        try:
            status = (proc / str(pid) / "status").read_text()
        except OSError:
            continue
        kib = next((float(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
        rss += kib
        try:
            rollup = (proc / str(pid) / "smaps_rollup").read_text()
            pss += next(float(x.split()[1]) for x in rollup.splitlines() if x.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            pss += kib
    return rss / 1024, pss / 1024


class PeakSampler:
    """Samples the process tree's memory in a thread; keeps the peaks."""

    def __init__(self, root: int | None = None, every: float = 0.5) -> None:
        self.root = root or os.getpid()
        self.every = every
        self.peak_rss = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory_mib(self.root)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def per_site_mib(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of peak memory over the site count (MiB per extra site)."""
    if len(points) < 2:
        return float("nan")
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def bench_flower_scale(
    work: Path, counts: Sequence[int] = (10, 50, 100), *, rounds: int = 3, timeout: float = 900
) -> dict[str, Any]:
    """Run the tiny stage at each site count on Flower's simulation engine; the figures."""
    from server.registry import Registry
    from simulations.bench import FOUNDATION, _plan, steady_state
    from simulations.flower_run import BackendSettings, run_plan_in_simulation
    from simulations.synthetic import make_sites

    backend = BackendSettings(cpus_per_site=1)  # two actors on 2 cores, as measured
    out: dict[str, Any] = {
        "backend": backend.federation_config(0).replace("num-supernodes=0 ", ""),
        "actors": backend.actors,
        "runs": [],
    }
    for count in counts:
        logger.info("Flower simulation engine: %d virtual sites …", count)
        root = work / f"flower-{count}"
        sites = [
            p.parent
            for p in make_sites(
                root / "sites", sites=count, seed=3, size=16, cases_per_site=6, pet_sites=0
            )
        ]
        plan = _plan([{**FOUNDATION, "min_sites": 1, "rounds": rounds}], f"flower-{count}")
        plan_path = root / "plan.json"
        plan_path.write_text(plan.model_dump_json())
        with PeakSampler() as sampler:
            run = run_plan_in_simulation(
                plan_path,
                sites,
                registry=root / "registry",
                state_root=root / "state",
                work_dir=root / "flower",
                site_wait=120,
                timeout=timeout,
                quiet=True,
            )
        records = [
            r for r in Registry(root / "registry").metrics(plan.name) if r["kind"] == "round"
        ]
        entry = {
            "sites": count,
            "wall_s": run.wall_s,
            "rounds": len(records),
            "first_round_s": records[0]["wall_s"] if records else float("nan"),
            **steady_state(records, workers=backend.actors),
            "peak_rss_tree_mib": sampler.peak_rss,
            "peak_pss_tree_mib": sampler.peak_pss,
        }
        out["runs"].append(entry)
        logger.info("%s", json.dumps(entry, default=str))
    points = [(r["sites"], r["peak_pss_tree_mib"]) for r in out["runs"]]
    out["mib_per_extra_site"] = per_site_mib(points)
    out["mib_per_extra_site_rss"] = per_site_mib(
        [(r["sites"], r["peak_rss_tree_mib"]) for r in out["runs"]]
    )
    return out


def main(out: Path, counts: Sequence[int]) -> dict[str, Any]:
    """Run :func:`bench_flower_scale` under a temporary folder; write ``out/flower_scale.json``."""
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = bench_flower_scale(Path(tmp), counts)
    results["total_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower_scale.json").write_text(json.dumps(results, indent=2))
    return results
