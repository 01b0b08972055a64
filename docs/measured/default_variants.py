"""The default plan against variants on the default sites, in process (issue 11).

Runs ``examples/plans/unicon_retrain.toml`` (the default plan until 2026-12-03, when the
``lora`` variant below became ``examples/plans/unicon.toml``) as written (``default``), with
a light segmentation decoder (``light``: ``decoder_width = 8`` on ``lesion-seg`` and
rank-2 decoder deltas on the PET modality), with its lesion head fitted analytically
(``analytic-seg``:
:func:`simulations.baseline_plans.analytic_segmentation_plan`) or with task-owned encoder
deltas instead of a classification stage that retrains the backbone (``lora``:
:func:`lora_plan`, today's default plan with ``--class-lr 0.001``), and
prints each stage's upload share, the final R row and the wall time. ``--name`` names the
plan (it seeds the run: the same name gives a paired comparison). Run from the repository
root, one variant at a time (about 8-9 min each on 2 cores):

    .venv/bin/unicon simulate make-data --out /tmp/def/sites --sites 4 --size 32 \\
        --cases 40 --pet-sites 2 --unlabelled 10
    .venv/bin/python docs/measured/default_variants.py light --sites /tmp/def/sites \\
        --work /tmp/def/work

Figures of 2026-12-03 (README, "Upload against a light decoder" and the analytic-seg
paragraph): default 0.744 / 0.671 / 0.470 / 0.561, light 0.721 / 0.687 / 0.442 / 0.537,
analytic-seg 0.721 / 0.769 / 0.316 / 0.282 (lesion-class@ct, survival@ct, lesion-seg@ct,
lesion-seg@pet; that run used an equivalent inline transform under another plan name, so its
seeds differ from this script's).

Figures of 2026-12-03 (fourth session; README "Low-rank task deltas on the self-supervised
encoder"; sites made with ``--extra-test 40``, 203 test cases; one torch thread, two runs
side by side), lesion-class@ct / survival@ct / lesion-seg@ct / lesion-seg@pet:

    default --name s1                        0.818 / 0.745 / 0.477 / 0.676   423 s
    default --name s2                        0.759 / 0.744 / 0.464 / 0.697   408 s
    lora --name s1 --class-lr 0.001          0.808 / 0.710 / 0.526 / 0.719   602 s
    lora --name s2 --class-lr 0.001          0.813 / 0.736 / 0.562 / 0.735   608 s
    lora --name s1 --class-lr 0.003          0.488 / 0.727 / 0.538 / 0.681   615 s
    lora --name s1 --class-lr 0.001 --levels 1,2   0.773 / 0.735 / 0.477 / 0.704   389 s
    lora --name s2 --class-lr 0.001 --levels 1,2   0.724 / 0.729 / 0.473 / 0.675   388 s
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

PLAN = Path(__file__).resolve().parents[2] / "examples" / "plans" / "unicon_retrain.toml"


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


def lora_plan(
    raw: dict[str, Any],
    ranks: dict[str, int] | None = None,
    lr: float | None = None,
    levels: list[int] | None = None,
) -> dict[str, Any]:
    """``raw`` whose task stages own low-rank encoder deltas instead of retraining the backbone.

    The classification stage trains only what it adds (its head and its ``lora_rank``
    deltas on every level): the backbone stays the self-supervised foundation's, so every
    task stage uploads its head and deltas only. ``ranks`` per task (default
    classification 8, survival 4, segmentation 8); ``lr`` overrides the classification
    stage's learning rate; ``levels`` the encoder levels with deltas (default all).
    """
    ranks = ranks or {"lesion-class": 8, "survival": 4, "lesion-seg": 8}
    out = copy.deepcopy(raw)
    for stage in out["stages"]:
        for task in stage.get("add_tasks", []):
            if task["name"] in ranks:
                task["lora_rank"] = ranks[task["name"]]
                if levels is not None:
                    task["lora_levels"] = levels
        if stage["name"] == "classification":
            stage.pop("train", None)  # only what the stage adds
            if lr is not None:
                stage["optimizer"] = {**stage["optimizer"], "lr": lr}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=("default", "light", "analytic-seg", "lora"))
    parser.add_argument("--sites", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--name", default=None, help="plan name (seeds the run)")
    parser.add_argument("--class-lr", type=float, default=None, help="lora: classification lr")
    parser.add_argument("--levels", default=None, help="lora: encoder levels, e.g. 1,2")
    args = parser.parse_args()
    raw: dict[str, Any] = tomllib.loads(PLAN.read_text())
    if args.variant == "light":
        raw = light_plan(raw)
    elif args.variant == "analytic-seg":
        raw = analytic_segmentation_plan(raw)
    elif args.variant == "lora":
        levels = [int(v) for v in args.levels.split(",")] if args.levels else None
        raw = lora_plan(raw, lr=args.class_lr, levels=levels)
    raw["name"] = args.name or f"default-{args.variant}"
    sites = sorted(p for p in args.sites.iterdir() if (p / "manifest.yaml").exists())
    print({k: round(v, 4) for k, v in upload_fractions(raw).items()})
    clock = Clock()
    result = run_federated(raw["name"], raw, sites, args.work / raw["name"], clock.elapsed)
    print(dict(zip(result.tasks, (round(v, 4) for v in result.R[-1]), strict=True)))
    print(f"wall {clock.elapsed():.0f} s")


if __name__ == "__main__":
    main()
