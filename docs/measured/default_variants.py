"""The default plan against two variants on the default sites, in process (issue 11).

Runs ``examples/plans/unicon.toml`` as written (``default``), with a light segmentation
decoder (``light``: ``decoder_width = 8`` on ``lesion-seg`` and rank-2 decoder deltas on the
PET modality) or with its lesion head fitted analytically (``analytic-seg``:
:func:`simulations.baseline_plans.analytic_segmentation_plan`), and prints each stage's
upload share, the final R row and the wall time. Run from the repository root, one variant
at a time (about 8-9 min each on 2 cores):

    .venv/bin/unicon simulate make-data --out /tmp/def/sites --sites 4 --size 32 \\
        --cases 40 --pet-sites 2 --unlabelled 10
    .venv/bin/python docs/measured/default_variants.py light --sites /tmp/def/sites \\
        --work /tmp/def/work

Figures of 2026-12-03 (README, "Upload against a light decoder" and the analytic-seg
paragraph): default 0.744 / 0.671 / 0.470 / 0.561, light 0.721 / 0.687 / 0.442 / 0.537,
analytic-seg 0.721 / 0.769 / 0.316 / 0.282 (lesion-class@ct, survival@ct, lesion-seg@ct,
lesion-seg@pet; that run used an equivalent inline transform under another plan name, so its
seeds differ from this script's).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from simulations.baseline_plans import analytic_segmentation_plan
from simulations.baselines import Clock, run_federated
from simulations.bench_learning import upload_fractions

PLAN = Path(__file__).resolve().parents[2] / "examples" / "plans" / "unicon.toml"


def light_plan(raw: dict[str, Any], width: int = 8, rank: int = 2) -> dict[str, Any]:
    """``raw`` with a light lesion decoder and low-rank PET decoder deltas."""
    out = copy.deepcopy(raw)
    for stage in out["stages"]:
        for task in stage.get("add_tasks", []):
            if task["name"] == "lesion-seg":
                task["decoder_width"] = width
        for modality in stage.get("add_modalities", []):
            if modality.get("decoder_lora"):
                modality["decoder_lora"] = {t: rank for t in modality["decoder_lora"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=("default", "light", "analytic-seg"))
    parser.add_argument("--sites", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    raw: dict[str, Any] = tomllib.loads(PLAN.read_text())
    if args.variant == "light":
        raw = light_plan(raw)
    elif args.variant == "analytic-seg":
        raw = analytic_segmentation_plan(raw)
    raw["name"] = f"default-{args.variant}"
    sites = sorted(p for p in args.sites.iterdir() if (p / "manifest.yaml").exists())
    print({k: round(v, 4) for k, v in upload_fractions(raw).items()})
    clock = Clock()
    result = run_federated(raw["name"], raw, sites, args.work / args.variant, clock.elapsed)
    print(dict(zip(result.tasks, (round(v, 4) for v in result.R[-1]), strict=True)))
    print(f"wall {clock.elapsed():.0f} s")


if __name__ == "__main__":
    main()
