"""``unicon simulate``: a whole federation on this machine, with a live view and a report.

- ``unicon simulate make-data --out DIR --sites N --seed S`` writes synthetic hospitals in
  the site format (NIfTI + manifest), read through the same pipeline a hospital uses.
- ``unicon simulate [--plan PLAN] [--sites DIR ...] [--out REPORT] [--quick] [--dp EPS]``
  runs a plan (default: the UNICON scenario over freshly generated data) on Flower's
  simulation engine with the real ServerApp and ClientApp (``--engine inprocess`` runs the
  same apps in this process, without Ray, for quick checks), shows stage/round/sites/loss
  while it runs, prints a summary table and writes the report (``report.md``,
  ``results.json``, PNG plots). ``--compare all`` (or a comma list) also runs the baselines
  of :mod:`simulations.baselines` on the same sites and reports them side by side.
  ``--holdout-site NAME`` keeps one site out of all training and reports its test metrics
  after every stage next to the federation's (``unseen`` in ``results.json``); with the
  generated data, ``--holdout-site hospital-shifted`` adds a fifth site whose scanner lies
  outside the others' ranges (``make-data --shifted-site``).

The command line lives here; :mod:`simulations.simulate_setup` (sites, plan, checks),
:mod:`simulations.simulate_run` (the run, baselines, privacy, report) and
:mod:`simulations.simulate_summary` (the summary and ``--json``) do the work. Their public
names stay importable from here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from simulations.simulate_run import SimulateOptions, console, run_simulation
from simulations.simulate_setup import (
    DEFAULT_PLAN,
    GENERATED_UNLABELLED,
    QUICK,
    plan_for_run,
    site_capabilities,
)
from simulations.simulate_summary import summary_json

__all__ = [
    "DEFAULT_PLAN",
    "GENERATED_UNLABELLED",
    "QUICK",
    "app",
    "console",
    "make_data",
    "plan_for_run",
    "simulate",
    "site_capabilities",
    "summary_json",
]


class _SimulateGroup(TyperGroup):
    """``unicon simulate`` takes options; a stray word is explained, not "No such command"."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            raise click.UsageError(
                f"unexpected argument {args[0]!r}: `unicon simulate` takes options only, and "
                f"its one sub-command is {', '.join(sorted(self.commands))}. For several site "
                "folders repeat the option: --sites A --sites B (or pass one folder that "
                "holds the site folders).",
                ctx,
            )
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_SimulateGroup,
    help="Run a whole federation on this machine.",
    invoke_without_command=True,
    no_args_is_help=False,
)
logger = logging.getLogger(__name__)

PlanOption = Annotated[Path | None, typer.Option(help="Plan (default: the UNICON scenario).")]
SitesOption = Annotated[
    list[Path] | None,
    typer.Option(
        help="Site folder, or a folder of site folders; repeat the option for more "
        "(--sites A --sites B). Each folder's manifest names a distinct site."
    ),
]
OutOption = Annotated[Path, typer.Option(help="Report folder.")]
QuickOption = Annotated[
    bool,
    typer.Option(
        help=f"Tiny model, 16³ patches, {QUICK['rounds']} rounds per stage, no augmentation "
        "(about a minute)."
    ),
]
DpOption = Annotated[
    float | None, typer.Option(help="DP-SGD at every site with this target ε per stage.")
]
EngineOption = Annotated[
    str, typer.Option(help="flower (simulation engine) or inprocess (no Ray).")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the generated data.")]
CompareOption = Annotated[
    str | None,
    typer.Option(
        help="Also run baselines on the same sites: 'all' or a comma list of naive, ewc, "
        "lwf, centralised, local, no-pet, single-task, unet, analytic-seg (in-process "
        "engine; unet: a MONAI BasicUNet per segmentation route, trained centrally; "
        "analytic-seg: UNICON with its segmentation heads fitted analytically)."
    ),
]
MiaOption = Annotated[
    bool,
    typer.Option(
        "--mia/--no-mia",
        help="After the run, attack the final model with a loss-threshold membership "
        "inference per trained route (report section 'Privacy in practice').",
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the summary as JSON on stdout (see README); progress goes to stderr.",
    ),
]
HoldoutOption = Annotated[
    str | None,
    typer.Option(
        "--holdout-site",
        help="Keep this site out of all training and evaluate it after every stage as an "
        "unseen hospital (with generated data, 'hospital-shifted' adds a site with a "
        "scanner outside the others' ranges).",
    ),
]
SitesCountOption = Annotated[
    int,
    typer.Option(
        "--sites-count",
        min=1,
        help="Number of generated hospitals (without --sites; half of them with PET). "
        "A count that would not fit in memory is refused up front with an estimate.",
    ),
]


@app.callback()
def simulate(
    ctx: typer.Context,
    plan: PlanOption = None,
    sites: SitesOption = None,
    out: OutOption = Path("report"),
    quick: QuickOption = False,
    dp: DpOption = None,
    engine: EngineOption = "flower",
    seed: SeedOption = 0,
    compare: CompareOption = None,
    mia: MiaOption = True,
    as_json: JsonOption = False,
    holdout_site: HoldoutOption = None,
    sites_count: SitesCountOption = 4,
) -> None:
    """Run a plan over site folders (default: generated data) and write the report.

    Exit code 1 if the simulation fails, 2 for a wrong command line (an unknown
    ``--holdout-site``, or one that leaves a stage fewer than its ``min_sites``).
    """
    console.stderr = as_json  # with --json, stdout carries the JSON document alone
    if ctx.invoked_subcommand is not None:
        return
    options = SimulateOptions(
        plan=plan,
        sites=sites,
        out=out,
        quick=quick,
        dp=dp,
        engine=engine,
        seed=seed,
        compare=compare,
        mia=mia,
        as_json=as_json,
        holdout_site=holdout_site,
        sites_count=sites_count,
    )
    run_simulation(options)


@app.command("make-data")
def make_data(
    out: Annotated[Path, typer.Option(help="Folder for the site folders.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Volume edge in voxels.")] = 32,
    cases: Annotated[int, typer.Option(help="Mean cases per site.")] = 24,
    pet_sites: Annotated[int | None, typer.Option(help="Sites with PET (default half).")] = None,
    unlabelled: Annotated[
        int, typer.Option(min=0, help="Train cases per site with images and no label.")
    ] = 0,
    shifted_site: Annotated[
        bool,
        typer.Option(
            "--shifted-site",
            help="Add one more site, hospital-shifted, whose CT gain, offset, noise and blur "
            "lie beyond the other sites' ranges (an unseen hospital for --holdout-site).",
        ),
    ] = False,
    extra_test: Annotated[
        int,
        typer.Option(
            min=0,
            help="More labelled test cases per site, from a stream of their own (the other "
            "cases do not change): a larger test split, narrower intervals.",
        ),
    ] = 0,
) -> None:
    """Write synthetic hospitals (NIfTI volumes + site manifests)."""
    from simulations.synthetic import make_sites

    paths = make_sites(
        out,
        sites=sites,
        seed=seed,
        size=size,
        cases_per_site=cases,
        pet_sites=pet_sites,
        unlabelled_per_site=unlabelled,
        shifted_site=shifted_site,
        extra_test_per_site=extra_test,
    )
    for path in paths:
        console.print(f"  {path}")
    console.print(f"[green]{len(paths)} site(s) written under {out}")
