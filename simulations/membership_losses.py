"""Per-case losses of the membership attack: a site's members (train) and non-members (test).

See :mod:`simulations.membership` for the attack and the survival proxy; :class:`SiteDatasets`
loads each site's cases once for every attacked route.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn
from torch.utils.data import DataLoader

from client.data import CaseDataset, build_dataset, label_key
from client.losses import cox_per_sample, per_sample_loss
from client.manifest import SiteManifest
from simulations.membership_stats import CaseLosses
from unicon_model.schema import Plan, TaskSpec

logger = logging.getLogger(__name__)

_BATCH = 8


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


class SiteDatasets:
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
        """The site's ``split`` cases on ``modality`` (built on first use)."""
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


def site_losses(
    model: nn.Module,
    datasets: SiteDatasets,
    manifest: SiteManifest,
    task: TaskSpec,
    modality: str,
    *,
    device: torch.device,
) -> CaseLosses:
    """One site's members (``train``) and non-members (``test``) losses on one route.

    Survival through :func:`survival_losses` (one joint risk set), the other kinds through
    :func:`case_losses` on each split.
    """
    train = datasets.get(manifest, "train", modality)
    test = datasets.get(manifest, "test", modality)
    if task.kind == "survival":
        return survival_losses(model, train, test, task, device=device)
    return CaseLosses(
        case_losses(model, train, task, device=device),
        case_losses(model, test, task, device=device),
    )
