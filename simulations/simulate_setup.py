"""What ``unicon simulate`` settles before anything runs: the site folders and the plan as run.

The site folders of ``--sites`` (:func:`site_folders`), the capabilities the sites will
report (:func:`site_capabilities`), the plan with ``--quick``, ``--dp`` and SecAgg+ fitted
to the sites (:func:`plan_for_run`) and with a held-out site (:func:`plan_with_holdout`),
and the checks of the command line that refuse a run before anything is written
(:func:`check_options`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)

GENERATED_UNLABELLED = 10
"""Unlabelled train cases per generated site (images only: the self-supervised stage's)."""
DEFAULT_PLAN = Path(__file__).resolve().parents[1] / "examples" / "plans" / "unicon.toml"
QUICK = {
    "model": {"widths": [4, 8, 16], "adapter_rank": 2, "head_hidden": 8},
    "data": {"patch_size": [16, 16, 16], "augmentation": {}},
    "rounds": 2,
}
"""What ``--quick`` changes in the plan: a 3-level narrow encoder, 16³ patches, two rounds,
no augmentation (two rounds are too few to profit from it)."""


def site_folders(paths: list[Path]) -> list[Path]:
    """Site folders from ``--sites`` (a site folder or a folder of them); one per site name."""
    from client.errors import SiteError
    from client.site_folder import MANIFEST_NAMES, check_unique_sites, find_manifest

    folders: list[Path] = []
    try:
        for path in paths:
            if not path.is_dir():
                raise typer.BadParameter(f"{path} is not a folder", param_hint="--sites")
            if find_manifest(path) is not None:
                folders.append(path)
                continue
            found = sorted(p for p in path.iterdir() if p.is_dir() and find_manifest(p))
            if not found:
                raise typer.BadParameter(
                    f"{path} holds no site folder with a manifest ({' or '.join(MANIFEST_NAMES)})",
                    param_hint="--sites",
                )
            folders += found
        check_unique_sites(folders)
    except SiteError as e:
        raise typer.BadParameter(str(e), param_hint="--sites") from e
    return folders


def site_capabilities(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """Site name -> the capabilities its manifest gives (no policy, no ε spent yet).

    What each in-process site will report when queried, read before anything runs, so a
    holdout site that leaves a stage short of ``min_sites`` is refused up front.
    """
    from client.manifest import load_manifest
    from client.site_folder import manifest_in

    out: dict[str, dict[str, Any]] = {}
    for folder in folders:
        manifest = load_manifest(manifest_in(folder))
        out[manifest.site] = {
            "site": manifest.site,
            "modalities": list(manifest.modalities),
            "counts": manifest.counts(),
            "policy": {},
            "epsilon": 0.0,
        }
    return out


def quiet_flower() -> None:
    """Flower's in-process logging follows ``UNICON_LOG_LEVEL`` (default WARNING).

    Flower sets its logger to DEBUG on import, so SecAgg+ and round chatter would otherwise
    scroll through the live view and the summary of an in-process simulation.
    """
    import flwr.supercore.logger  # noqa: F401  (creates and configures the "flwr" logger)

    level = os.environ.get("UNICON_LOG_LEVEL", "WARNING").upper()
    logging.getLogger("flwr").setLevel(
        level if level in logging.getLevelNamesMapping() else "WARNING"
    )


def _fit_lora_rank(component: dict[str, Any], widths: list[int]) -> None:
    """Clamp a component's encoder-delta rank to what the ``--quick`` encoder's levels hold.

    A delta's rank is at most ``min(in, out)`` channels of every level it adapts (its
    ``lora_levels``, or all levels); the narrow encoder of ``--quick`` holds less than the
    plan's. Levels the narrow encoder does not have are left for ``plan check`` to report.
    """
    from unicon_model.lora import level_channels

    rank = component.get("lora_rank", 0)
    if rank <= 0:
        return
    levels = component.get("lora_levels") or range(len(widths))
    fitting = min(
        (level_channels(widths, level) for level in levels if level < len(widths)), default=rank
    )
    component["lora_rank"] = min(rank, fitting)


def plan_for_run(plan: Path, *, quick: bool, dp: float | None, secure_sites: int) -> dict[str, Any]:
    """The plan as run: ``--quick`` sizes, ``--dp`` at every stage, SecAgg+ fitted to the sites."""
    from unicon_model.schema import load_plan

    raw: dict[str, Any] = json.loads(load_plan(plan).model_dump_json())
    if quick:
        raw["model"].update(QUICK["model"])
        raw["data"].update(QUICK["data"])
        for stage in raw["stages"]:
            stage["rounds"] = QUICK["rounds"]
            for component in stage["add_modalities"] + stage["add_tasks"]:
                _fit_lora_rank(component, raw["model"]["widths"])
    for stage in raw["stages"]:
        stage["min_sites"] = min(stage["min_sites"], secure_sites)
        if stage.get("secure_aggregation") and secure_sites < stage["secagg"]["num_shares"]:
            stage["secagg"]["num_shares"] = max(secure_sites, 2)
            stage["secagg"]["reconstruction_threshold"] = min(
                stage["secagg"]["reconstruction_threshold"], max(secure_sites, 2)
            )
        if dp is not None:
            stage["privacy"] = {"mode": "local", "target_epsilon": dp}
    return raw


def plan_with_holdout(
    plan: Path | None, quick: bool, dp: float | None, folders: list[Path], holdout: str | None
) -> tuple[dict[str, Any], Any]:
    """The plan as run (:func:`plan_for_run`) with ``[evaluation] holdout_sites``, validated.

    ``min_sites`` and SecAgg+ are fitted to the training sites (those not held out).

    Raises
    ------
    typer.BadParameter
        With every problem of the holdout site (:func:`server.eligibility.holdout_problems`).
    """
    from server.eligibility import holdout_problems
    from unicon_model.schema import validate_plan

    training = len(folders) - (1 if holdout else 0)
    raw = plan_for_run(plan or DEFAULT_PLAN, quick=quick, dp=dp, secure_sites=max(training, 1))
    if holdout:
        raw["evaluation"] = {"holdout_sites": [holdout]}
    parsed = validate_plan(raw)
    if holdout:
        problems = holdout_problems(parsed, site_capabilities(folders))
        if problems:
            raise typer.BadParameter("; ".join(problems), param_hint="--holdout-site")
    return raw, parsed


def checked_methods(compare: str | None) -> list[str]:
    """The baselines of ``--compare`` (none without it), in run order.

    Raises
    ------
    typer.BadParameter
        Naming every unknown baseline.
    """
    from simulations.baselines import BaselineError, parse_methods

    try:
        return parse_methods(compare) if compare else []
    except BaselineError as e:
        raise typer.BadParameter(str(e), param_hint="--compare") from e


def check_options(
    sites: list[Path] | None,
    sites_count: int,
    holdout_site: str | None,
    *,
    engine: str,
    seed: int,
) -> tuple[list[Path], bool]:
    """Check the site options of ``unicon simulate`` before anything is written or removed.

    Returns
    -------
    tuple
        The site folders of ``--sites`` (empty without: the sites are generated) and
        whether the generated data get the shifted site (``--holdout-site
        hospital-shifted`` without ``--sites``).

    Raises
    ------
    typer.BadParameter
        For ``--sites-count`` with ``--sites``, a site count that would not fit in memory,
        a ``--sites`` folder without site folders, or a ``--holdout-site`` that is not
        among the sites.
    """
    from simulations.flower_run import memory_problem
    from simulations.synthetic import SHIFTED_SITE, site_profiles

    shifted = not sites and holdout_site == SHIFTED_SITE
    if sites and sites_count != 4:
        raise typer.BadParameter(
            "--sites-count sets how many hospitals are generated; with --sites the folders "
            "given are the sites: drop one of the two options",
            param_hint="--sites-count",
        )
    too_many = memory_problem(len(sites or []) if sites else sites_count + shifted, engine=engine)
    if too_many:
        raise typer.BadParameter(too_many + "; lower --sites-count", param_hint="--sites-count")
    folders: list[Path] = []
    if sites:
        folders = site_folders(sites)
        names = list(site_capabilities(folders)) if holdout_site else []
    else:
        names = [p.name for p in site_profiles(sites_count, seed=seed)] + [SHIFTED_SITE] * shifted
    if holdout_site is not None and holdout_site not in names:
        raise typer.BadParameter(
            f"{holdout_site!r} is not among the sites {names}; name one of them"
            + ("" if sites else f" (or {SHIFTED_SITE!r} to add a site with a shifted scanner)"),
            param_hint="--holdout-site",
        )
    return folders, shifted
