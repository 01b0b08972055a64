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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn
from torch.utils.data import DataLoader

from client.data import CaseDataset, build_dataset, label_key
from client.losses import cox_per_sample, per_sample_loss
from client.manifest import SiteManifest, load_manifest
from server.registry import Registry
from unicon_model.metrics.uncertainty import (
    DEFAULT_REPLICATES,
    Interval,
    bootstrap_counts,
    bootstrap_interval,
    bootstrap_seed,
)
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

_BATCH = 8


@dataclass(frozen=True)
class CaseLosses:
    """Per-case losses of one site on one route: members (train) and non-members (test)."""

    member: NDArray[np.float64]
    nonmember: NDArray[np.float64]


# ---------------------------------------------------------------------- the statistic
def _win_matrix(member: NDArray[np.float64], nonmember: NDArray[np.float64]) -> NDArray:
    """``W[i, j] = 1`` if member ``i``'s loss is below non-member ``j``'s, 0.5 if equal."""
    m, n = member[:, None], nonmember[None, :]
    return (m < n).astype(np.float64) + 0.5 * (m == n)


def _losses(values: ArrayLike, what: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} losses hold NaN or Inf: pass finite per-case losses")
    return array


def attack_auc(member_losses: ArrayLike, nonmember_losses: ArrayLike) -> float:
    """AUC of the loss-threshold attack: ``P(loss_member < loss_non_member) + 0.5 P(tie)``.

    Equal to ``sklearn.metrics.roc_auc_score(is_member, -loss)``.

    Returns
    -------
    float
        In ``[0, 1]``; NaN when either group is empty.

    Raises
    ------
    ValueError
        If a loss is NaN or infinite.
    """
    member = _losses(member_losses, "member")
    nonmember = _losses(nonmember_losses, "non-member")
    if member.size == 0 or nonmember.size == 0:
        return math.nan
    return float(_win_matrix(member, nonmember).mean())


def attack_interval(
    strata: Sequence[CaseLosses],
    *,
    name: str,
    replicates: int = DEFAULT_REPLICATES,
) -> Interval:
    """Stratified bootstrap 95 % interval of the attack AUC over the pooled cases.

    Parameters
    ----------
    strata
        One entry per site: its members and non-members are resampled separately, so every
        replicate keeps each site's group sizes.
    name
        Seeds the resampling (:func:`~unicon_model.metrics.uncertainty.bootstrap_seed` of
        ``name/<stratum>/<group>``), e.g. the route.
    replicates
        Number of resamples ``B``.

    Returns
    -------
    Interval
        Undefined (NaN) without members or non-members.
    """
    member_counts: list[NDArray] = []
    nonmember_counts: list[NDArray] = []
    members: list[NDArray[np.float64]] = []
    nonmembers: list[NDArray[np.float64]] = []
    for i, stratum in enumerate(strata):
        for values, counts, store, group in (
            (stratum.member, member_counts, members, "member"),
            (stratum.nonmember, nonmember_counts, nonmembers, "nonmember"),
        ):
            array = _losses(values, group)
            if array.size:
                seed = bootstrap_seed(f"{name}/{i}/{group}")
                counts.append(bootstrap_counts(array.size, replicates=replicates, seed=seed))
                store.append(array)
    if not members or not nonmembers:
        return Interval.undefined()
    c = np.hstack(member_counts).astype(np.float64)
    d = np.hstack(nonmember_counts).astype(np.float64)
    wins = _win_matrix(np.concatenate(members), np.concatenate(nonmembers))
    replicate = np.einsum("bj,bj->b", c @ wins, d) / (c.sum(1) * d.sum(1))
    return bootstrap_interval(replicate)


# ---------------------------------------------------------------------- per-case losses
def _batches(dataset: CaseDataset, device: torch.device) -> Iterable[dict[str, Tensor]]:
    loader: DataLoader[dict[str, Tensor]] = DataLoader(dataset, batch_size=_BATCH)
    for raw in loader:
        yield {k: v.to(device) for k, v in raw.items()}


@torch.no_grad()
def case_losses(
    model: nn.Module, dataset: CaseDataset, task: TaskSpec, *, device: torch.device
) -> NDArray[np.float64]:
    """Per-case loss of ``task`` on the labelled cases of ``dataset`` (model in eval mode).

    Classification and segmentation through :func:`client.losses.per_sample_loss`; for
    survival use :func:`survival_losses` (the Cox term needs a risk set).
    """
    if task.kind not in {"classification", "segmentation"}:
        raise ValueError(
            f"case_losses takes classification or segmentation tasks, not {task.kind!r} "
            f"({task.name!r}); use survival_losses for survival"
        )
    model.to(device).eval()
    found: list[NDArray[np.float64]] = []
    for batch in _batches(dataset, device):
        if label_key(task.name, "has") not in batch:
            continue
        losses, counted = per_sample_loss(model, batch, task, modality=dataset.modality)
        found.append(losses[counted].double().cpu().numpy())
    return np.concatenate(found) if found else np.zeros(0)


@torch.no_grad()
def survival_losses(
    model: nn.Module,
    members: CaseDataset,
    nonmembers: CaseDataset,
    task: TaskSpec,
    *,
    device: torch.device,
) -> CaseLosses:
    """Per-event Cox terms of members and non-members in their joint risk set.

    See :data:`SURVIVAL_PROXY`: the risks of both splits are computed, then
    :func:`client.losses.cox_per_sample` scores every labelled case against the risk set
    of all of them; censored cases (no term of their own) are left out.
    """
    if task.kind != "survival":
        raise ValueError(f"survival_losses takes a survival task, not {task.kind!r}")
    model.to(device).eval()
    parts: dict[str, list[Tensor]] = {"risk": [], "time": [], "event": [], "member": []}
    has = label_key(task.name, "has")
    for flag, dataset in ((True, members), (False, nonmembers)):
        for batch in _batches(dataset, device):
            if has not in batch:
                continue
            keep = batch[has].bool()
            if not keep.any():
                continue
            batch = {k: v[keep] for k, v in batch.items()}
            clinical = batch.get(label_key(task.name, "clinical")) if task.covariates else None
            risk = model(
                batch["image"], modality=dataset.modality, task=task.name, clinical=clinical
            )
            parts["risk"].append(risk.float().reshape(-1).cpu())
            parts["time"].append(batch[label_key(task.name, "time")].float().cpu())
            parts["event"].append(batch[label_key(task.name, "event")].float().cpu())
            parts["member"].append(torch.full((int(keep.sum()),), flag))
    if not parts["risk"]:
        return CaseLosses(np.zeros(0), np.zeros(0))
    risk, time, event = (torch.cat(parts[k]) for k in ("risk", "time", "event"))
    member = torch.cat(parts["member"])
    terms = cox_per_sample(risk, time, event, torch.ones_like(member)).double().numpy()
    is_event = (event > 0).numpy()
    flags = member.numpy()
    return CaseLosses(terms[is_event & flags], terms[is_event & ~flags])


# ---------------------------------------------------------------------- routes and sites
def trained_routes(plan: Plan) -> dict[str, list[int]]:
    """``task@modality`` -> indices of the stages that trained it (objectives x modalities).

    Self-supervised tasks (``reconstruction``) are left out: they have no label to infer.
    """
    routes: dict[str, list[int]] = {}
    tasks = plan.tasks_until(len(plan.stages) - 1)
    for index, stage in enumerate(plan.stages):
        for task in stage.objective_tasks:
            if task not in tasks or tasks[task].self_supervised:
                continue
            for modality in plan.stage_modalities(index):
                routes.setdefault(f"{task}@{modality}", []).append(index)
    return routes


def _senders(record: Mapping[str, Any]) -> set[str]:
    """Sites whose round reply carried data: accepted plus rejected (both sent it)."""
    sites = record.get("sites") or []
    rejected = record.get("rejected") or {}
    return {str(s) for s in sites} | {str(s) for s in rejected}


def route_sites(plan: Plan, rounds: Sequence[Mapping[str, Any]], stages: Sequence[int]) -> set[str]:
    """Sites that sent data in at least one round of the given stages."""
    names = {plan.stages[i].name for i in stages}
    return {s for r in rounds if r.get("stage") in names for s in _senders(r)}


def data_left_sites(
    plan: Plan,
    rounds: Sequence[Mapping[str, Any]],
    *,
    bytes_up: Mapping[str, int] | None = None,
    bytes_down: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """What left each site: bytes, and per stage the components and the rounds it sent.

    Parameters
    ----------
    plan
        The plan as run (its stages' ``trained_components`` are what a reply carries).
    rounds
        The registry's round records (``kind == "round"``; ``sites`` and ``rejected`` name
        the sites whose reply carried data). A round resumed after a crash counts once.
    bytes_up, bytes_down
        Tensor bytes per site, as the coordinator counted them.

    Returns
    -------
    dict
        Site -> ``bytes_up``, ``bytes_down``, ``rounds`` (total) and ``stages``: stage ->
        ``components`` (sorted), ``form`` (``update``, ``masked update`` under SecAgg+,
        ``statistics`` for analytic heads: XᵀX, XᵀY and counts) and ``rounds``. Besides
        these, every evaluation sends aggregate metrics only.
    """
    stages = {s.name: s for s in plan.stages}
    sent: dict[str, dict[str, set[int]]] = {}
    for record in rounds:
        stage = record.get("stage")
        if stage not in stages:
            continue
        for site in _senders(record):
            sent.setdefault(site, {}).setdefault(stage, set()).add(int(record.get("round", 0)))
    out: dict[str, dict[str, Any]] = {}
    for site in sorted(set(sent) | set(bytes_up or {}) | set(bytes_down or {})):
        per_stage: dict[str, Any] = {}
        for name, taken in sent.get(site, {}).items():
            spec = stages[name]
            form = (
                "statistics"
                if spec.is_analytic
                else ("masked update" if spec.secure_aggregation else "update")
            )
            per_stage[name] = {
                "components": sorted(spec.trained_components),
                "form": form,
                "rounds": len(taken),
            }
        ordered = {s.name: per_stage[s.name] for s in plan.stages if s.name in per_stage}
        out[site] = {
            "bytes_up": int((bytes_up or {}).get(site, 0)),
            "bytes_down": int((bytes_down or {}).get(site, 0)),
            "rounds": sum(v["rounds"] for v in ordered.values()),
            "stages": ordered,
        }
    return out


# ---------------------------------------------------------------------- the attack
class _Datasets:
    """Each site's ``train`` and ``test`` cases per modality, loaded once for every route.

    A dataset holds the cases labelled for any attacked task of its modality; each task's
    losses then count only its own labelled cases.
    """

    def __init__(self, plan: Plan, tasks: Mapping[str, TaskSpec], cache: Path | None) -> None:
        self.plan = plan
        self.tasks = tasks
        self.cache = cache
        self.modalities = plan.modalities_until(len(plan.stages) - 1)
        self.loaded: dict[tuple[str, str, str], CaseDataset] = {}

    def get(self, manifest: SiteManifest, split: str, modality: str) -> CaseDataset:
        key = (manifest.site, split, modality)
        if key not in self.loaded:
            self.loaded[key] = build_dataset(
                manifest,
                split=split,
                modality=self.modalities[modality],
                tasks=self.tasks,
                data=self.plan.data,
                cache_dir=self.cache,
            )
        return self.loaded[key]


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
    datasets = _Datasets(plan, attacked, cache_dir)
    out: dict[str, dict[str, Any]] = {}
    for route, stage_indices in routes.items():
        task_name, _, modality = route.partition("@")
        task = tasks[task_name]
        took_part = route_sites(plan, rounds, stage_indices)
        strata: list[CaseLosses] = []
        per_site: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for site, manifest in sorted(manifests.items()):
            if site not in took_part:
                skipped[site] = "sent no update for this route (not a member site)"
                continue
            try:
                train = datasets.get(manifest, "train", modality)
                test = datasets.get(manifest, "test", modality)
                if task.kind == "survival":
                    losses = survival_losses(model, train, test, task, device=device)
                else:
                    losses = CaseLosses(
                        case_losses(model, train, task, device=device),
                        case_losses(model, test, task, device=device),
                    )
            except Exception as e:  # one route failing leaves the others
                logger.warning("membership attack on %s at %s failed: %s", route, site, e)
                skipped[site] = f"failed: {e}"
                continue
            if losses.member.size == 0 or losses.nonmember.size == 0:
                skipped[site] = (
                    f"{losses.member.size} member(s), {losses.nonmember.size} non-member(s)"
                )
                continue
            interval = attack_interval([losses], name=f"{route}/{site}", replicates=replicates)
            per_site[site] = {
                "auc": attack_auc(losses.member, losses.nonmember),
                "ci": _pair(interval),
                "members": int(losses.member.size),
                "nonmembers": int(losses.nonmember.size),
            }
            strata.append(losses)
        if not strata:
            logger.info("membership attack: no site to attack on %s (%s)", route, skipped)
            out[route] = {
                "epsilon_target": _route_epsilon(plan, stage_indices),
                "mia_auc": None,
                "mia_auc_ci": None,
                "per_site": {},
                "skipped": skipped,
            }
            continue
        member = np.concatenate([s.member for s in strata])
        nonmember = np.concatenate([s.nonmember for s in strata])
        out[route] = {
            "epsilon_target": _route_epsilon(plan, stage_indices),
            "mia_auc": attack_auc(member, nonmember),
            "mia_auc_ci": _pair(attack_interval(strata, name=route, replicates=replicates)),
            "members": int(member.size),
            "nonmembers": int(nonmember.size),
            "per_site": per_site,
            "skipped": skipped,
        }
    return out


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
    out: dict[str, Any] = {
        "epsilon": {k: float(v) for k, v in sorted(epsilon.items())},
        "max_epsilon": max((float(v) for v in epsilon.values()), default=0.0),
        "dp": {
            s.name: {"mode": s.privacy.mode, "target_epsilon": s.privacy.target_epsilon}
            for s in plan.stages
            if s.privacy.mode != "none"
        },
        "data_left_sites": data_left_sites(plan, rounds, bytes_up=bytes_up, bytes_down=bytes_down),
    }
    if not attack:
        out["mia"] = None
        return out
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
    return _json_safe(out)


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
