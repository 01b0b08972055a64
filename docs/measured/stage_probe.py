"""One stage of the default plan, alone, from a registry version's encoder (issue 11).

Builds a one-stage plan: the default plan's ``[model]`` and ``[data]``, the backbone and CT
adapter seeded from ``--version`` of ``--registry`` (``[model.pretrained]``), and the
default plan's ``--stage`` (``classification``, ``prognosis`` or ``segmentation``) with
``--set`` overrides (``key=value``, the value read as JSON; ``optimizer.lr=0.01`` sets a
nested key). A stage that lists no ``train`` trains its new task's head only (the encoder
frozen, as in the full plan). Runs it in process over the site folders and prints the final
test metrics and the wall time. Run from the repository root (one torch thread: about
20-40 s for prognosis, 3-4 min for classification or segmentation):

    .venv/bin/unicon simulate make-data --out /tmp/def2/sites --sites 4 --size 32 \\
        --cases 40 --pet-sites 2 --unlabelled 10 --extra-test 40
    # a registry of the default plan on those sites (in process, e.g. the README's
    # docs/measured/default_variants.py default run), then e.g.
    OMP_NUM_THREADS=1 .venv/bin/python docs/measured/stage_probe.py --sites /tmp/def2/sites \\
        --registry DIR/registry --version v0002-classification --stage prognosis \\
        --name bs2 --set min_sites=3 --set rounds=2 --set local_epochs=2 \\
        --set batch_size=4 --set optimizer.lr=0.001

Figures of 2026-12-03 (README, "Survival recipe and repeated runs"; the registry of a run of
the day's earlier default plan named ``bs2``): survival@ct 0.714 with the overrides above
(the prognosis stage before that day), 0.750 as planned now (only ``--set min_sites=3``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from simulations.baselines import Clock, run_federated

PLAN = Path(__file__).resolve().parents[2] / "examples" / "plans" / "unicon_retrain.toml"


def stage_plan(
    raw: dict[str, Any], version: Path, stage: str, overrides: list[str], name: str
) -> dict[str, Any]:
    """The one-stage plan: ``stage`` of ``raw`` on the encoder of ``version``."""
    stages = {s["name"]: s for s in raw["stages"]}
    if stage not in stages or stages[stage].get("add_modalities"):
        raise SystemExit(f"--stage must be one of the plan's task stages, got {stage!r}")
    chosen = copy.deepcopy(stages[stage])
    chosen["add_modalities"] = [{"name": "ct"}]
    chosen.setdefault("train", [f"task/{t['name']}" for t in chosen.get("add_tasks", [])])
    chosen["min_sites"] = 2
    chosen.pop("secure_aggregation", None)
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        target = chosen
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = json.loads(value)
    model = dict(raw["model"])
    model["pretrained"] = {"path": str(version), "components": ["backbone", "modality/ct"]}
    return {"name": name, "model": model, "data": raw["data"], "stages": [chosen]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=Path, required=True)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--version", default="v0002-classification")
    p.add_argument("--stage", default="prognosis")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--name", default="stage-probe", help="the plan name (it seeds the sites)")
    p.add_argument("--work", type=Path, default=Path("/tmp/stage-probe"))
    p.add_argument("--plan", type=Path, default=PLAN, help="the plan whose stage runs")
    a = p.parse_args()
    raw = tomllib.loads(a.plan.read_text())
    plan = stage_plan(raw, a.registry / "versions" / a.version, a.stage, a.overrides, a.name)
    sites = sorted(q for q in a.sites.iterdir() if (q / "manifest.yaml").exists())
    clock = Clock()
    result = run_federated(a.name, plan, sites, a.work / a.name, clock.elapsed)
    final = {t: round(v, 4) for t, v in zip(result.tasks, result.R[-1], strict=True)}
    wall = round(clock.elapsed())
    print(json.dumps({"stage": plan["stages"][0], "final": final, "wall_s": wall}))


if __name__ == "__main__":
    main()
