"""System benchmarks measured side by side in one run (``make bench``).

Prints a table and writes ``bench/results.json``:

- **upload**: bytes a site uploads per round of each UNICON stage vs the full model;
- **secagg**: wall time per round with SecAgg+ vs plain FedAvg, same sites and stage;
- **scale**: wall time per round and peak memory (this process) at several site counts with a
  tiny model; the first round (preprocessing, caching, every component sent) apart from the
  steady state (round 2 on), whose framework overhead is round wall time / summed site
  training + evaluation time (the in-process engine serves the sites one after another), with
  the mean time of every phase (see :mod:`server.timing`);
- **analytic**: federated vs pooled ridge head, max difference, IID and one class per site;
- **bootstrap**: what the evaluation's bootstrap intervals and calibration add to a
  ``make simulate`` run (:func:`bench_bootstrap_overhead`);
- **steady-state overhead** at 10 sites, tiny vs the default scenario's model on 32³
  (:mod:`simulations.bench_overhead`; alone: ``--only steady-overhead``).

and the **learning** benchmarks on the default UNICON scenario (4 generated hospitals, 32³,
the plan of ``make simulate``):

- **forgetting**: BWT and average forgetting of UNICON vs naive sequential fine-tuning;
- **federated / centralised**: each task's final metric, UNICON over the centralised run;
- **DP utility**: the foundation and prognosis stages with DP-SGD at every site for
  ε ∈ {1, 4, 8} per stage, next to the same stages without DP (ε = ∞);
- **box prompts**: Dice with each test case's label box vs without, on lesions < 1 cm³
  (:mod:`simulations.bench_prompts`; alone: ``--only box-prompts``);
- **analytic segmentation head**: its Dice, rounds and upload vs the gradient head's on the
  same frozen encoder (:mod:`simulations.bench_analytic_seg`; alone: ``--only analytic-seg``);
- **new structures**: every earlier label's Dice (liver, lungs, spine) before and after a
  lesion stage, gradient and analytic organ head (:mod:`simulations.bench_structures`;
  alone: ``--only new-structures``);
- **new labels**: the liver's and lungs' Dice before and after a stage that adds the spine to
  the same task as a label extension, gradient and analytic, next to the three labels learned
  together (:mod:`simulations.bench_label_extension`; alone: ``--only new-labels``).

Everything runs the real ClientApp through the in-process grid (the ServerApp's own
transport), so the figures compare protocols and methods, not engines.

The parts: :mod:`simulations.bench_system`, :mod:`simulations.bench_learning` and
:mod:`simulations.bench_bootstrap`; this module runs them, prints the tables and is the
command line (``python -m simulations.bench``). Their names stay importable from here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulations.bench_analytic_seg import analytic_seg_only, analytic_seg_row
from simulations.bench_bootstrap import (
    EVALUATION_EXTRAS,
    _extras_patched,
    bench_bootstrap_overhead,
    bootstrap_figure,
    evaluation_requests,
)
from simulations.bench_label_extension import (
    label_extension_gain,
    label_extension_only,
    label_extension_row,
)
from simulations.bench_learning import (
    LEARNING_METHODS,
    _subtle_gain,
    bench_learning,
    upload_fractions,
)
from simulations.bench_only import print_figure_row, write_only_results
from simulations.bench_overhead import (
    bench_steady_overhead,
    overhead_figure,
    steady_overhead_only,
)
from simulations.bench_repeats import difference_figure
from simulations.bench_structures import (
    new_structures_gain,
    new_structures_only,
    new_structures_row,
)
from simulations.bench_system import (
    FOUNDATION,
    PET,
    PROGNOSIS,
    SEGMENTATION,
    TINY_MODEL,
    bench_analytic,
    bench_plan,
    bench_scale,
    bench_secagg,
    bench_upload,
    one_class_sites,
    steady_state,
)
from simulations.bench_system import bench_plan as _plan
from simulations.synthetic import make_sites

__all__ = [
    "EVALUATION_EXTRAS",
    "FOUNDATION",
    "LEARNING_METHODS",
    "PET",
    "PROGNOSIS",
    "SEGMENTATION",
    "TINY_MODEL",
    "_extras_patched",
    "_plan",
    "_subtle_gain",
    "bench_analytic",
    "bench_bootstrap_overhead",
    "bench_learning",
    "bench_plan",
    "bench_scale",
    "bench_secagg",
    "bench_upload",
    "box_prompts_only",
    "console",
    "evaluation_requests",
    "main",
    "steady_state",
    "upload_fractions",
]

logger = logging.getLogger(__name__)
console = Console()


def main(
    out: Path = Path("bench"),
    scale: Sequence[int] = (2, 10, 50, 100),
    *,
    system: bool = True,
    learning: bool = True,
    quick_learning: bool = False,
    repeats: int | None = None,
    workers: int | None = None,
    targets_only: bool = False,
    plan: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmarks and write ``out/results.json``.

    ``repeats``: runs per method of the learning comparison; ``workers``: learning runs side
    by side (see :func:`simulations.bench_learning.bench_learning`; ``None``: its defaults).
    ``targets_only``: of the learning benchmarks only the comparison behind issue 11's
    targets (``bench_learning(extras=False)``: no DP utility, analytic segmentation, box
    prompts, new structures or new labels); ``make bench-full`` on the default scenario.
    ``plan``: the learning comparison runs this plan file instead of ``make simulate``'s.
    """
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if learning:
            results["learning"] = bench_learning(
                root / "learning",
                quick=quick_learning,
                repeats=repeats,
                workers=workers,
                extras=not targets_only,
                plan=plan,
            )
        if learning and not targets_only:
            results["learning"]["new_structures"] = new_structures_gain(
                root / "new-structures", quick=quick_learning
            )
            results["learning"]["new_labels"] = label_extension_gain(
                root / "new-labels", quick=quick_learning
            )
        if not system:
            return _finish(results, out)
        results.update(_system(root, scale))
    return _finish(results, out)


def _system(root: Path, scale: Sequence[int]) -> dict[str, Any]:
    """The system benchmarks, in the order of the table, on sites generated under ``root``."""
    results: dict[str, Any] = {}
    sites = _generated(root / "sites", sites=5, seed=1, cases_per_site=8, pet_sites=2)
    console.print("upload bytes per stage …")
    results["upload"] = bench_upload(sites[:3], root / "upload")
    results["secagg"] = []
    for count in (5, 20):
        console.print(f"SecAgg+ vs plain at {count} sites …")
        group = (
            sites
            if count == 5
            else _generated(root / "sites20", sites=20, seed=2, cases_per_site=6, pet_sites=0)
        )
        results["secagg"].append(bench_secagg(group, root / f"secagg-{count}"))
    results["scale"] = []
    for count in scale:
        console.print(f"scale: {count} sites …")
        group = _generated(root / f"scale{count}", sites=count, seed=3, cases_per_site=6,
                           pet_sites=0)  # fmt: skip
        results["scale"].append(bench_scale(group, root / f"scale-{count}"))
    results["steady_overhead"] = bench_steady_overhead(root / "steady-overhead")
    console.print("analytic head: IID and one class per site …")
    results["analytic"] = {
        "iid": bench_analytic(sites[:4], root / "analytic-iid"),
        "one_class_per_site": bench_analytic(
            one_class_sites(root / "oneclass", 4), root / "analytic-one"
        ),
    }
    console.print("evaluation bootstrap: its share of make simulate …")
    results["bootstrap"] = bench_bootstrap_overhead(root / "bootstrap")
    return results


def _generated(
    out: Path, *, sites: int, seed: int, cases_per_site: int, pet_sites: int
) -> list[Path]:
    """Folders of ``sites`` generated 16³ hospitals under ``out``."""
    return [
        p.parent
        for p in make_sites(
            out, sites=sites, seed=seed, size=16, cases_per_site=cases_per_site, pet_sites=pet_sites
        )
    ]


def _finish(results: dict[str, Any], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if "learning" in results:
        _print_learning(results["learning"])
    if "upload" in results:
        _print(results)
    return results


def _print_learning(learning: dict[str, Any]) -> None:
    table = Table(title=f"learning benchmarks ({learning['scenario']}, in-process)")
    table.add_column("benchmark")
    table.add_column("figure")
    bwt, forgetting = learning["bwt"], learning["forgetting"]
    table.add_row(
        "forgetting: UNICON vs naive fine-tuning",
        f"BWT {bwt['unicon']:+.3f} vs {bwt['naive']:+.3f}; average forgetting "
        f"{forgetting['unicon']:.3f} vs {forgetting['naive']:.3f}",
    )
    for task, ratio in learning["federated_over_centralised"].items():
        final = learning["final"]
        table.add_row(
            f"federated / centralised, {task}",
            f"{final['unicon'][task]:.3f} / {final['centralised'][task]:.3f} = {ratio:.3f}",
        )
    for task, best in learning.get("unicon_minus_best_baseline", {}).items():
        table.add_row(
            f"UNICON - best continual baseline, {task}",
            f"{best['difference']:+.3f} (best: {best['method']} {best['value']:.3f})",
        )
    for task, best in learning.get("repeats", {}).get("unicon_minus_best_baseline", {}).items():
        runs = len(best["unicon"])
        if runs < 2:  # one run each: the single-run rows above, without an interval
            continue
        table.add_row(
            f"UNICON - best continual baseline over {runs} runs each, {task}",
            difference_figure(best),
        )
    for task, best in learning.get("analytic_seg_minus_best_baseline", {}).items():
        table.add_row(
            f"UNICON with analytic segmentation heads - best continual baseline, {task}",
            f"{best['difference']:+.3f} (best: {best['method']} {best['value']:.3f})",
        )
    for task, ratio in learning.get("unicon_over_unet", {}).items():
        table.add_row(f"UNICON / central MONAI BasicUNet, {task}", f"{ratio:.3f}")
    for task, gain in learning.get("pet_gain", {}).items():
        per_site = ", ".join(f"{s} {v:+.3f}" for s, v in gain["per_site"].items())
        table.add_row(f"PET gain (vs no-PET route), {task}", f"{gain['mean']:+.3f} ({per_site})")
    for route, subtle in learning.get("pet_gain_subtle", {}).items():
        table.add_row(f"PET gain on lesions barely visible on CT, {route}", _subtle_row(subtle))
    for stage, fraction in learning.get("upload_fraction", {}).items():
        table.add_row(f"upload per site and round, {stage}", f"{fraction:.1%} of the model")
    for epsilon, metrics in learning.get("dp_utility", {}).items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "max_epsilon_spent")
        table.add_row(f"DP utility, ε = {'∞' if epsilon == 'inf' else epsilon}", shown)
    if "box_prompts" in learning:
        table.add_row(*_box_row(learning["box_prompts"]))
    if "analytic_seg" in learning:
        table.add_row(*analytic_seg_row(learning["analytic_seg"]))
    if "new_structures" in learning:
        table.add_row(*new_structures_row(learning["new_structures"]))
    if "new_labels" in learning:
        table.add_row(*label_extension_row(learning["new_labels"]))
    console.print(table)


def _box_row(box: Any) -> tuple[str, str]:
    """The table row of :func:`simulations.bench_prompts.bench_box_prompts`'s figures."""
    if not isinstance(box, dict) or "small_lesions" not in box:
        error = box.get("error") if isinstance(box, dict) else box
        return "box prompts vs none, lesions < 1 cm³", f"not computed: {error}"
    small, every = box["small_lesions"], box["all"]
    return (
        f"box prompts vs none, lesions < {box['threshold_cm3']:g} cm³, {box['route']}",
        f"Dice {small['prompted']:.3f} vs {small['unprompted']:.3f} = {small['gain']:+.3f} "
        f"(target +{box['target_gain']:.2f}: {'met' if box['met'] else 'not met'}; "
        f"{small['lesions']} lesions in {small['cases']} test cases); all "
        f"{every['cases']} cases {every['prompted']:.3f} vs {every['unprompted']:.3f}",
    )


def box_prompts_only(out: Path, *, quick: bool) -> dict[str, Any]:
    """``--only box-prompts``: the box-prompt benchmark alone on the learning scenario's sites.

    Writes ``out/results.json`` as ``{"box_prompts": {..., "scenario": ...}}`` and prints its
    row (in ``make bench`` the same figures are ``learning.box_prompts``).
    """
    from simulations.bench_learning import box_prompt_gain, learning_scenario

    with tempfile.TemporaryDirectory() as tmp:
        sites, raw, scenario = learning_scenario(Path(tmp), quick=quick)
        box = {**box_prompt_gain(raw, sites, Path(tmp)), "scenario": scenario}
    write_only_results(out, "box_prompts", box)
    print_figure_row(f"box prompts ({scenario}, in-process)", _box_row(box))
    return box


def _subtle_row(subtle: Any) -> str:
    """One table cell of a :func:`simulations.subtle_lesions.subtle_lesion_gain` report."""
    if not isinstance(subtle, dict):
        return f"not computed: {subtle}"
    gain, pet, ablation, counts = (
        subtle["gain"],
        subtle["pooled"]["pet"],
        subtle["pooled"]["ablation"],
        subtle["counts"],
    )
    return (
        f"voxel recall {gain['subtle_recall']:+.3f} ({pet['subtle_recall']:.3f} vs "
        f"{ablation['subtle_recall']:.3f}), lesions detected {gain['subtle_detection']:+.3f} "
        f"({pet['subtle_detection']:.3f} vs {ablation['subtle_detection']:.3f}); "
        f"{counts['subtle_lesions']} lesions in {counts['subtle_cases']} of "
        f"{counts['cases']} test cases (Dice on all of them {gain['dice']:+.3f})"
    )


def _print(results: dict[str, Any]) -> None:
    table = Table(title="system benchmarks (in-process grid, tiny model, 16³)")
    table.add_column("benchmark")
    table.add_column("figure")
    upload = results["upload"]
    for stage, fraction in upload["fraction_of_full"].items():
        table.add_row(
            f"upload per round, {stage}",
            f"{upload['upload_bytes_per_round'][stage]:,.0f} B = {fraction:.1%} of "
            f"the full model ({upload['full_model_bytes']:,} B)",
        )
    for entry in results["secagg"]:
        table.add_row(
            f"SecAgg+ vs plain, {entry['sites']} sites",
            f"{entry['secure_s']:.2f} s vs {entry['plain_s']:.2f} s per round "
            f"(×{entry['ratio']:.2f})",
        )
    for entry in results["scale"]:
        table.add_row(
            f"scale, {entry['sites']} sites",
            f"first round {entry['first_round_s']:.2f} s (×{entry['overhead_first_round']:.2f} "
            f"the summed local training); steady state {entry['steady_round_s']:.2f} s/round "
            f"= ×{entry['steady_overhead']:.2f} the summed site training + evaluation; peak "
            f"RSS {entry['peak_rss_mib']:.0f} MiB",
        )
    for row in results.get("steady_overhead", {}).get("rows", []):
        table.add_row(*overhead_figure(row))
    for name, entry in results["analytic"].items():
        table.add_row(
            f"analytic vs pooled ridge, {name}",
            f"max |Δw| {entry['max_abs_difference']:.2e} over {entry['cases']} cases",
        )
    if "bootstrap" in results:
        table.add_row(
            "evaluation bootstrap + calibration, share of make simulate",
            bootstrap_figure(results["bootstrap"]),
        )
    console.print(table)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="UNICON benchmarks (prints a table).")
    parser.add_argument(
        "--only",
        choices=(
            "system",
            "learning",
            "targets",
            "flower-scale",
            "box-prompts",
            "analytic-seg",
            "new-structures",
            "new-labels",
            "steady-overhead",
        ),
        default=None,
        help="targets: only the learning comparison behind issue 11's targets (make "
        "bench-full); flower-scale: tiny sites on Flower's simulation engine (not in make bench); "
        "box-prompts, analytic-seg, new-structures, new-labels: that benchmark of the learning "
        "part alone; "
        "steady-overhead: 10 in-process sites, tiny vs default model",
    )
    parser.add_argument(
        "--sites-counts",
        default="10,50,100",
        help="site counts of --only flower-scale (comma list)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="plan file of the learning comparison (default: make simulate's plan)",
    )
    parser.add_argument(
        "--quick-learning",
        action="store_true",
        help="learning benchmarks on the quick scenario (minutes instead of about an hour)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per method (training seeds) of the UNICON-vs-baselines comparison "
        "(default: 3 with --quick-learning, 1 otherwise)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="learning runs side by side, each in a process of one torch thread "
        "(default: 2, or 1 on a single core)",
    )
    args = parser.parse_args()
    if args.only == "flower-scale":
        from simulations.flower_scale import main as flower_scale

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        counts = [int(c) for c in args.sites_counts.split(",") if c.strip()]
        console.print_json(json.dumps(flower_scale(args.out, counts)))
        raise SystemExit(0)
    if args.only == "box-prompts":
        box_prompts_only(args.out, quick=args.quick_learning)
        raise SystemExit(0)
    if args.only == "analytic-seg":
        analytic_seg_only(args.out, quick=args.quick_learning)
        raise SystemExit(0)
    if args.only == "new-structures":
        new_structures_only(args.out, quick=args.quick_learning)
        raise SystemExit(0)
    if args.only == "new-labels":
        label_extension_only(args.out, quick=args.quick_learning)
        raise SystemExit(0)
    if args.only == "steady-overhead":
        steady_overhead_only(args.out)
        raise SystemExit(0)
    main(
        args.out,
        system=args.only not in ("learning", "targets"),
        learning=args.only != "system",
        targets_only=args.only == "targets",
        plan=args.plan,
        quick_learning=args.quick_learning,
        repeats=args.repeats,
        workers=args.workers,
    )
