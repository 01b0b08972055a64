"""Privacy in practice: a membership-inference attack and the data that left each site.

This is an evaluation tool of ``unicon simulate``, never something a site runs. The
simulator holds every site's cases, so it can play the strongest simple attacker: one who
knows which cases trained the model (each site's ``train`` split: the *members*) and which
did not (its ``test`` split: the *non-members*), and asks how well the final model's loss
on a case tells the two apart.

Attack (:data:`MIA_METHOD`)
    Loss threshold (Yeom et al. 2018): a case whose loss under the final model is lower is
    guessed to be a member. Its success over every threshold is the ROC AUC of the score
    ``-loss`` against membership, ``P(loss_member < loss_non_member) + 0.5 P(tie)`` (the
    Mann-Whitney statistic; ``sklearn.metrics.roc_auc_score`` is the test reference).
    0.5 is chance: the model's losses say nothing about membership; 1.0 separates them.
    Routes (``task@modality``) are those some stage trained: the stage's objective tasks
    on its modalities, self-supervised ``reconstruction`` tasks left out. Members are the
    labelled ``train`` cases of the sites that sent an update in at least one round of
    those stages (a site that never took part, e.g. a held-out one, has no members).

Per-case losses
    :func:`client.losses.per_sample_loss` for classification (cross-entropy) and
    segmentation (cross-entropy + Dice). The Cox loss has no per-case value: its risk sets
    couple the cases. The proxy (:data:`SURVIVAL_PROXY`) is each event case's negative log
    partial-likelihood term (:func:`client.losses.cox_per_sample`, Efron ties) with the
    risk set taken over the site's train *and* test cases together, so members and
    non-members are scored against the same risk set (within their own splits the larger
    train split would give members larger terms whatever the model learned). Censored
    cases have no term of their own and are left out of the survival attack.

Interval (:data:`MIA_CI_METHOD`)
    Percentile bootstrap, stratified: each site's members and non-members are resampled
    separately with replacement (B = :data:`~unicon_model.metrics.uncertainty.DEFAULT_REPLICATES`,
    seeded by the route, site and group names), the AUC recomputed for all B replicates at
    once as ``c^T W d / (sum c sum d)`` with ``W`` the member x non-member win matrix.

The parts: :mod:`simulations.membership_stats` (the statistic and its interval),
:mod:`simulations.membership_losses` (per-case losses), :mod:`simulations.membership_sites`
(trained routes, the sites that took part, what left each site); their names stay
importable from here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from client.manifest import SiteManifest, load_manifest
from server.registry import Registry
from simulations.membership_losses import (
    SiteDatasets,
    case_losses,
    site_losses,
    survival_losses,
)
from simulations.membership_sites import data_left_sites, route_sites, trained_routes
from simulations.membership_stats import CaseLosses, attack_auc, attack_interval
from unicon_model.metrics.uncertainty import DEFAULT_REPLICATES, Interval
from unicon_model.schema import Plan, TaskSpec

logger = logging.getLogger(__name__)

__all__ = [
    "MIA_CI_METHOD",
    "MIA_METHOD",
    "SURVIVAL_PROXY",
    "CaseLosses",
    "attack_auc",
    "attack_interval",
    "case_losses",
    "data_left_sites",
    "membership_attack",
    "privacy_report",
    "route_sites",
    "simulation_privacy",
    "survival_losses",
    "trained_routes",
]

MIA_METHOD = (
    "loss-threshold membership inference (lower loss => member): ROC AUC of -loss of the "
    "final model, each site's labelled train cases (members) against its test cases "
    "(non-members); 0.5 = chance"
)
"""The attack, in words (``privacy.mia_method`` in ``results.json``)."""

SURVIVAL_PROXY = (
    "survival per-case loss: each event case's negative log partial-likelihood term (Efron "
    "ties) with the risk set over the site's train and test cases together; censored cases "
    "left out"
)
"""The per-case Cox loss used by the attack (``privacy.survival_proxy``)."""

MIA_CI_METHOD = (
    f"95% percentile bootstrap, members and non-members of each site resampled separately "
    f"(B={DEFAULT_REPLICATES}, seeded by route and site)"
)
"""How ``mia_auc_ci`` is computed (``privacy.mia_ci_method``)."""


def membership_attack(
    plan: Plan,
    model: nn.Module,
    manifests: Mapping[str, SiteManifest],
    rounds: Sequence[Mapping[str, Any]],
    *,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
    replicates: int = DEFAULT_REPLICATES,
) -> dict[str, dict[str, Any]]:
    """The loss-threshold attack on every trained route of ``model`` (see the module doc).

    Parameters
    ----------
    plan
        The plan as run.
    model
        The final model (e.g. the registry's last version).
    manifests
        Site name -> manifest; every site with cases of a route is attacked.
    rounds
        The registry's round records (which sites took part in which stage).
    device
        Where the model runs (default CPU).
    cache_dir
        Preprocessed-case cache (``None``: none).
    replicates
        Bootstrap resamples.

    Returns
    -------
    dict
        Route -> ``epsilon_target`` (the largest target ε of the stages that trained it;
        ``None`` when one of them had no DP, i.e. ε = ∞), ``mia_auc`` (pooled over sites),
        ``mia_auc_ci`` (``[lo, hi]``), ``members``, ``nonmembers``, ``per_site`` (site ->
        ``auc``, ``ci``, ``members``, ``nonmembers``) and ``skipped`` (site -> why not attacked).
    """
    device = device or torch.device("cpu")
    tasks = plan.tasks_until(len(plan.stages) - 1)
    routes = trained_routes(plan)
    attacked = {t: tasks[t] for t in (r.partition("@")[0] for r in routes)}
    attacker = _Attacker(model, SiteDatasets(plan, attacked, cache_dir), device, replicates)
    out: dict[str, dict[str, Any]] = {}
    for route, stage_indices in routes.items():
        task = tasks[route.partition("@")[0]]
        took_part = route_sites(plan, rounds, stage_indices)
        strata, per_site, skipped = _attack_sites(attacker, route, task, manifests, took_part)
        epsilon = _route_epsilon(plan, stage_indices)
        out[route] = _route_entry(route, strata, per_site, skipped, epsilon, replicates)
    return out


@dataclass(frozen=True)
class _Attacker:
    """What the attack on every site and route shares."""

    model: nn.Module
    datasets: SiteDatasets
    device: torch.device
    replicates: int


def _attack_sites(
    attacker: _Attacker,
    route: str,
    task: TaskSpec,
    manifests: Mapping[str, SiteManifest],
    took_part: set[str],
) -> tuple[list[CaseLosses], dict[str, Any], dict[str, str]]:
    """Each site's losses and AUC on one route: (strata, per-site entries, skipped sites)."""
    modality = route.partition("@")[2]
    strata: list[CaseLosses] = []
    per_site: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for site, manifest in sorted(manifests.items()):
        if site not in took_part:
            skipped[site] = "sent no update for this route (not a member site)"
            continue
        try:
            losses = site_losses(
                attacker.model, attacker.datasets, manifest, task, modality, device=attacker.device
            )
        except Exception as e:  # one route failing leaves the others
            logger.warning("membership attack on %s at %s failed: %s", route, site, e)
            skipped[site] = f"failed: {e}"
            continue
        if losses.member.size == 0 or losses.nonmember.size == 0:
            skipped[site] = f"{losses.member.size} member(s), {losses.nonmember.size} non-member(s)"
            continue
        name = f"{route}/{site}"
        interval = attack_interval([losses], name=name, replicates=attacker.replicates)
        per_site[site] = {
            "auc": attack_auc(losses.member, losses.nonmember),
            "ci": _pair(interval),
            "members": int(losses.member.size),
            "nonmembers": int(losses.nonmember.size),
        }
        strata.append(losses)
    return strata, per_site, skipped


def _route_entry(
    route: str,
    strata: Sequence[CaseLosses],
    per_site: dict[str, Any],
    skipped: dict[str, str],
    epsilon: float | None,
    replicates: int,
) -> dict[str, Any]:
    """A route's entry of :func:`membership_attack`: pooled over the attacked sites."""
    if not strata:
        logger.info("membership attack: no site to attack on %s (%s)", route, skipped)
        return {
            "epsilon_target": epsilon,
            "mia_auc": None,
            "mia_auc_ci": None,
            "per_site": {},
            "skipped": skipped,
        }
    member = np.concatenate([s.member for s in strata])
    nonmember = np.concatenate([s.nonmember for s in strata])
    return {
        "epsilon_target": epsilon,
        "mia_auc": attack_auc(member, nonmember),
        "mia_auc_ci": _pair(attack_interval(strata, name=route, replicates=replicates)),
        "members": int(member.size),
        "nonmembers": int(nonmember.size),
        "per_site": per_site,
        "skipped": skipped,
    }


def _route_epsilon(plan: Plan, stages: Sequence[int]) -> float | None:
    """Largest target ε of the stages that trained a route; ``None`` (ε = ∞) if one had no DP."""
    specs = [plan.stages[i].privacy for i in stages]
    if not specs or any(p.mode == "none" for p in specs):
        return None
    return max(p.target_epsilon for p in specs)


def _pair(interval: Interval) -> list[float] | None:
    if not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
        return None
    return [interval.lo, interval.hi]


def privacy_report(
    plan: Plan,
    registry: Registry,
    manifests: Mapping[str, SiteManifest],
    *,
    epsilon: Mapping[str, float],
    bytes_up: Mapping[str, int],
    bytes_down: Mapping[str, int],
    attack: bool = True,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The ``privacy`` entry of ``results.json`` for a finished run.

    Parameters
    ----------
    plan
        The plan as run.
    registry
        Its :class:`server.registry.Registry`: the last committed version of the plan is
        attacked, and the round records say which site sent what.
    manifests
        Site name -> manifest.
    epsilon, bytes_up, bytes_down
        Per site, as the run recorded them.
    attack
        ``False`` skips the attack (``--no-mia``); the data that left each site is kept.
    device, cache_dir
        As in :func:`membership_attack`.

    Returns
    -------
    dict
        ``epsilon`` (per site), ``max_epsilon``, ``dp`` (stage -> mode and target ε of the
        stages with DP), ``data_left_sites`` (:func:`data_left_sites`), and unless skipped
        ``mia`` (:func:`membership_attack`, per route), ``mia_version``, ``mia_method``,
        ``mia_ci_method``, ``survival_proxy`` and ``mia_wall_s``.
    """
    rounds = [r for r in registry.metrics(plan.name) if r.get("kind") == "round"]
    out = _what_was_sent(plan, rounds, epsilon=epsilon, bytes_up=bytes_up, bytes_down=bytes_down)
    if not attack:
        out["mia"] = None
        return out
    return _with_attack(out, plan, registry, manifests, rounds, device=device, cache_dir=cache_dir)


def _what_was_sent(
    plan: Plan,
    rounds: Sequence[Mapping[str, Any]],
    *,
    epsilon: Mapping[str, float],
    bytes_up: Mapping[str, int],
    bytes_down: Mapping[str, int],
) -> dict[str, Any]:
    """The privacy entry without the attack: ε spent, DP stages and what left each site."""
    return {
        "epsilon": {k: float(v) for k, v in sorted(epsilon.items())},
        "max_epsilon": max((float(v) for v in epsilon.values()), default=0.0),
        "dp": {
            s.name: {"mode": s.privacy.mode, "target_epsilon": s.privacy.target_epsilon}
            for s in plan.stages
            if s.privacy.mode != "none"
        },
        "data_left_sites": data_left_sites(plan, rounds, bytes_up=bytes_up, bytes_down=bytes_down),
    }


def _with_attack(
    out: dict[str, Any],
    plan: Plan,
    registry: Registry,
    manifests: Mapping[str, SiteManifest],
    rounds: Sequence[Mapping[str, Any]],
    *,
    device: torch.device | None,
    cache_dir: Path | None,
) -> dict[str, Any]:
    """``out`` with the attack on the plan's last committed version (``mia`` None without one)."""
    completed = registry.progress(plan.name).completed
    if not completed:
        logger.warning("membership attack: plan %r committed no version", plan.name)
        out["mia"] = None
        return out
    started = time.perf_counter()
    version = completed[-1].version
    model, _ = registry.load(version)
    out["mia"] = membership_attack(
        plan, model, manifests, rounds, device=device, cache_dir=cache_dir
    )
    out.update(
        mia_version=version,
        mia_method=MIA_METHOD,
        mia_ci_method=MIA_CI_METHOD,
        survival_proxy=SURVIVAL_PROXY,
        mia_wall_s=time.perf_counter() - started,
    )
    return cast(dict[str, Any], _json_safe(out))  # _json_safe keeps a dict a dict


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def simulation_privacy(
    plan: Plan,
    registry: Registry,
    folders: Sequence[Path],
    *,
    epsilon: Mapping[str, float],
    bytes_up: Mapping[str, int],
    bytes_down: Mapping[str, int],
    attack: bool = True,
) -> dict[str, Any]:
    """:func:`privacy_report` of a ``unicon simulate`` run over its site folders.

    The attack runs where the simulation trained (:func:`client.trainer.default_device`).
    An attack that fails is logged and recorded as ``mia_error``; the rest of the report
    (what left each site) is kept, so it never costs the run its report.
    """
    from client.site_folder import manifest_in
    from client.trainer import default_device

    manifests: dict[str, SiteManifest] = {}
    for folder in folders:
        manifest = load_manifest(manifest_in(folder))
        manifests[manifest.site] = manifest

    def report(run_attack: bool) -> dict[str, Any]:
        return privacy_report(
            plan,
            registry,
            manifests,
            epsilon=epsilon,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            attack=run_attack,
            device=default_device() if run_attack else None,
        )

    try:
        return report(attack)
    except Exception as e:  # the attack is an extra: the report is written without it
        logger.exception("membership attack failed")
        kept = report(False)
        kept["mia_error"] = str(e)
        return kept
