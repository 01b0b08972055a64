"""Steady-state overhead at 10 in-process sites, old fsyncs vs new, back to back.

The site fsyncs removed on 2026-12-02 (component-cache entries, the audit anchor's folder)
are forced back on for the ``old`` runs; ``new`` runs the code as it is. Two of each,
alternating (README, "Where the time goes"). Run from the repository root:

    FLWR_TELEMETRY_ENABLED=0 .venv/bin/python docs/measured/steady_fsync_ab.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import client.audit_files as audit_files
import client.component_cache as component_cache
import unicon_model.durable as durable
from simulations.bench import _generated
from simulations.bench_system import bench_scale


def main() -> None:
    """Run the four measurements and print one JSON line each."""
    root = Path("bench/steady_fsync_ab")
    root.mkdir(parents=True, exist_ok=True)
    sites = _generated(root / "sites", sites=10, seed=3, cases_per_site=6, pet_sites=0)
    real = durable.atomic_write
    results: dict[str, Any] = {}
    for label in ("old", "new", "old_2", "new_2"):
        force = label.startswith("old")

        def write(path: Any, content: Any, *, _force: bool = force, **options: Any) -> None:
            if _force:
                options |= {"fsync": True, "fsync_dir": True}
            real(path, content, **options)

        component_cache.atomic_write = write  # type: ignore[assignment]
        audit_files.atomic_write = write  # type: ignore[assignment]
        run = bench_scale(sites, root / label, rounds=4)
        phases = run["steady_phases"]
        results[label] = {
            "steady_overhead": run["steady_overhead"],
            "steady_round_s": run["steady_round_s"],
            "persist_s": phases.get("sites/persist_s"),
            "train_s": phases.get("sites/train_s"),
        }
        print(label, json.dumps(results[label]), flush=True)
    (root / "steady.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
