"""Model-level commands of the ``unicon`` command line: ``unicon plan check``.

Only what needs nothing but the model package lives here (checking a plan reads the plan,
and a ``[model.pretrained]`` file, but starts no Flower, site or coordinator code). The full
``unicon`` command line, with the site (``client``), coordinator (``server``) and simulation
(``simulations``) commands, is built one layer up by :mod:`unicon_cli.main`, which imports
:func:`plan_check` from here; this module imports nothing from those packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape

from unicon_model.cli_output import EXIT_PROBLEMS, Column, emit_json, fitted_table
from unicon_model.errors import PlanError
from unicon_model.schema import AugmentationSpec, Plan, load_plan, plan_warnings

PLAN_HELP = "Write and check federation plans."
"""Help of the ``plan`` group (the root CLI's ``plan`` group uses the same text)."""

app = typer.Typer(
    name="unicon",
    help="UNICON federated: the model-level commands (plan check).",
    no_args_is_help=True,
    add_completion=False,
)
"""The model-level commands alone; the ``unicon`` console script is :mod:`unicon_cli.main`."""
plan_app = typer.Typer(help=PLAN_HELP, no_args_is_help=True)
app.add_typer(plan_app, name="plan")
console = Console()


PLAN_COLUMNS = (
    Column("#", justify="right"),
    Column("stage"),
    Column("adds"),
    Column("trains", drop=2),
    Column("objectives", drop=3),
    Column("data", drop=1),
    Column("rounds", justify="right"),
    Column("secure"),
    Column("DP"),
)
"""``plan check`` columns; on a narrow terminal data, then trains, then objectives go."""


def stage_summary(plan: Plan, index: int) -> dict[str, Any]:
    """One stage as a ``plan check --json`` entry (keys in the README)."""
    stage = plan.stages[index]
    adds = [f"modality/{m.name}" for m in stage.add_modalities]
    adds += [f"task/{t.name}" for t in stage.add_tasks]
    return {
        "name": stage.name,
        "adds": adds,
        "trains": list(stage.trained_components),
        "objectives": list(stage.objective_tasks),
        "modalities": list(plan.stage_modalities(index)),
        "rounds": stage.rounds,
        "secure_aggregation": stage.secure_aggregation,
        "privacy": stage.privacy.model_dump(mode="json"),
    }


def describe_plan(plan: Plan, width: int = 80) -> RenderableType:
    """A table of the plan's stages (what each adds, trains and how) that fits ``width``."""
    rows = []
    for i, stage in enumerate(plan.stages):
        adds = [f"modality/{m.name}" for m in stage.add_modalities]
        adds += [
            f"task/{t.name} ({t.kind}, {t.head}"
            + (f", adds {list(t.labels[1:])} to {t.extends}" if t.extends else "")
            + ")"
            for t in stage.add_tasks
        ]
        privacy = stage.privacy
        dp = "-" if privacy.mode == "none" else f"{privacy.mode} ε≤{privacy.target_epsilon:g}"
        rows.append(
            [
                str(i),
                stage.name,
                ", ".join(adds) or "-",
                ", ".join(stage.trained_components),
                ", ".join(stage.objective_tasks),
                ", ".join(plan.stage_modalities(i)),
                str(stage.rounds),
                "SecAgg+" if stage.secure_aggregation else "-",
                dp,
            ]
        )
    title = f"plan {plan.name}: {len(plan.stages)} stage(s)"
    return fitted_table(title, PLAN_COLUMNS, rows, width, wrap=True)


def describe_augmentation(spec: AugmentationSpec) -> str:
    """One line: the random augmentation of the training cases, or ``off``."""
    if not spec.enabled:
        return "off"
    parts = []
    if spec.flip_prob > 0:
        parts.append(f"flips p={spec.flip_prob:g} per axis")
    if spec.affine_prob > 0 and (spec.rotate_deg > 0 or spec.scale_range > 0):
        parts.append(
            f"affine p={spec.affine_prob:g} (±{spec.rotate_deg:g}°, "
            f"zoom ×[{1 - spec.scale_range:g}, {1 + spec.scale_range:g}])"
        )
    if spec.intensity_prob > 0 and (spec.intensity_scale > 0 or spec.intensity_shift > 0):
        parts.append(
            f"intensity p={spec.intensity_prob:g} (×[{1 - spec.intensity_scale:g}, "
            f"{1 + spec.intensity_scale:g}], ±{spec.intensity_shift:g})"
        )
    if spec.noise_prob > 0 and spec.noise_std > 0:
        parts.append(f"noise p={spec.noise_prob:g} (σ={spec.noise_std:g})")
    return ", ".join(parts)


@plan_app.command("check")
def plan_check(
    plan: Annotated[Path, typer.Argument(help="Plan file (TOML or JSON).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (see README).")
    ] = False,
) -> None:
    """Validate a plan and list every problem at once; exit code 1 if any.

    A valid plan with settings that are almost certainly a mistake (a first stage that
    trains heads on a random, frozen encoder, see :func:`unicon_model.schema.plan_warnings`)
    gets a WARNING line per finding and exit code 0. A ``[model.pretrained]`` file is read
    as the coordinator will read it (a relative path starts at the current directory): a
    missing, pickled or mismatched file is a problem of ``model.pretrained.*``.
    """
    result: dict[str, Any] = {
        "plan": str(plan),
        "ok": False,
        "name": None,
        "problems": [],
        "warnings": [],
        "stages": [],
        "augmentation": None,
    }
    try:
        parsed = load_plan(plan)
    except PlanError as e:
        if as_json:
            emit_json({**result, "problems": list(e.problems) or [str(e)]})
        else:
            console.print(f"[red]Plan {plan} is invalid[/red] — {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(code=EXIT_PROBLEMS) from e
    from unicon_model.pretrained import pretrained_problems  # reads the file: torch, import late

    problems = pretrained_problems(parsed)  # relative paths start at the cwd, as in `run`
    augmentation = describe_augmentation(parsed.data.augmentation)
    warnings = plan_warnings(parsed)
    if as_json:
        emit_json(
            {
                **result,
                "ok": not problems,
                "name": parsed.name,
                "problems": list(problems),
                "warnings": list(warnings),
                "stages": [stage_summary(parsed, i) for i in range(len(parsed.stages))],
                "augmentation": augmentation,
            }
        )
        if problems:
            raise typer.Exit(code=EXIT_PROBLEMS)
        return
    if problems:
        error = PlanError(problems, str(plan))
        console.print(f"[red]Plan {plan} is invalid[/red] — {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=EXIT_PROBLEMS)
    _print_valid_plan(plan, parsed, augmentation, warnings)


def _print_valid_plan(plan: Path, parsed: Plan, augmentation: str, warnings: list[str]) -> None:
    """Print the human-readable report of ``plan check`` for a plan without problems."""
    console.print(describe_plan(parsed, console.width))
    console.print(f"Training augmentation: {escape(augmentation)}", soft_wrap=True)
    for warning in warnings:
        console.print(f"[bold yellow]WARNING[/bold yellow] {escape(warning)}", soft_wrap=True)
    if warnings:
        console.print(f"[yellow]Plan {plan} is valid, with {len(warnings)} warning(s).[/yellow]")
    else:
        console.print(f"[green]Plan {plan} is valid.[/green]")
