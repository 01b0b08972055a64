"""The PET stage alone, continued from a registry's segmentation version (issue 11).

Copies the stages a plan's run completed before ``pet`` (their versions and progress) from
``--registry`` into a fresh registry, then runs the plan again in process with the PET
stage changed by ``--set`` overrides (``key=value``, the value read as JSON; a dotted key
sets a nested field, ``add_modalities.0.lora_rank=8`` the PET modality's encoder deltas).
The coordinator resumes after the copied stages, so only the PET stage trains, from
exactly the model the full run had. Prints the final test metrics and the wall time.
Run from the repository root (one torch thread, about 1-2 min):

    OMP_NUM_THREADS=1 .venv/bin/python docs/measured/pet_probe.py --sites DIR/sites \\
        --registry DIR/unicon/registry --run-plan unicon-ct-pet \\
        --name p8 --set add_modalities.0.lora_rank=8

``--sites`` must be the sites the registry's run trained on (``make bench-full`` keeps them
in its work folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from server.coordinator import plan_digest
from server.registry import Registry
from simulations.baseline_runs import federate
from simulations.baselines import Clock
from unicon_model.schema import validate_plan

PLAN = Path(__file__).resolve().parents[2] / "examples" / "plans" / "unicon.toml"


def set_key(target: Any, key: str, value: Any) -> None:
    """Set the dotted ``key`` (list indices as numbers) of ``target`` to ``value``."""
    *parents, leaf = key.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
    if isinstance(target, list):
        target[int(leaf)] = value
    else:
        target[leaf] = value


def seeded_registry(source: Path, run_plan: str, work: Path, raw: dict[str, Any]) -> None:
    """``work/registry`` holding ``source``'s versions before ``pet``, resumable by ``raw``."""
    if work.exists():
        shutil.rmtree(work)
    target = work / "registry"
    progress = Registry(source).progress(run_plan)
    kept = [c for c in progress.completed if c.stage != "pet"]
    for c in kept:
        shutil.copytree(source / "versions" / c.version, target / "versions" / c.version)
    registry = Registry(target)
    progress.plan, progress.completed, progress.current = raw["name"], kept, None
    progress.plan_digest = plan_digest(validate_plan(raw))
    run = registry.run_dir(raw["name"])
    run.mkdir(parents=True, exist_ok=True)
    registry.save_progress(progress)
    old = Registry(source).run_dir(run_plan)
    records = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records if r.get("stage") != "pet")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=Path, required=True)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--run-plan", required=True, help="the plan name the registry's run used")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--name", default="pet-probe")
    p.add_argument("--work", type=Path, default=Path("/tmp/pet-probe"))
    p.add_argument("--plan", type=Path, default=PLAN)
    a = p.parse_args()
    raw = tomllib.loads(a.plan.read_text())
    raw["name"] = a.run_plan
    pet = next(s for s in raw["stages"] if s["name"] == "pet")
    for item in a.overrides:
        key, _, value = item.partition("=")
        set_key(pet, key, json.loads(value))
    work = a.work / a.name
    seeded_registry(a.registry, a.run_plan, work, raw)
    sites = sorted(q for q in a.sites.iterdir() if (q / "manifest.yaml").exists())
    clock = Clock()
    registry = federate(raw, sites, work)
    evaluation = [r for r in registry.metrics(a.run_plan) if r.get("kind") == "evaluation"][-1]
    final = {t: round(v, 4) for t, v in evaluation["pooled"].items()}
    print(json.dumps({"pet": pet, "final": final, "wall_s": round(clock.elapsed())}))


if __name__ == "__main__":
    main()
