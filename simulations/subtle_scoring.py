"""Scoring of :mod:`simulations.subtle_lesions`: Dice and subtle-lesion recall and detection.

:func:`score_route` predicts one route on one site's test cases and tallies the figures
against the subtle-lesion truth; :func:`score_sites` does it for every route and site, pooled
case by case (Dice) or voxel by voxel and lesion by lesion (recall, detection).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.ndimage import generate_binary_structure, label

from client.data import CaseDataset, label_key
from client.trainer import predict
from unicon_model.metrics.segmentation import dice_per_case, mean_dice_of_cases

if TYPE_CHECKING:
    from simulations.subtle_lesions import RouteModel


class SubtleLesionError(ValueError):
    """The analysis cannot run on these routes or sites (the message says why and the fix)."""


@dataclass
class Tally:
    """Running sums of one route at one site (or pooled)."""

    dice: list[torch.Tensor] = field(default_factory=list)
    subtle_voxels: int = 0
    subtle_hits: int = 0
    lesions: int = 0
    detected: int = 0

    def add(self, other: Tally) -> None:
        """Add ``other``'s sums (pooling sites)."""
        self.dice += other.dice
        self.subtle_voxels += other.subtle_voxels
        self.subtle_hits += other.subtle_hits
        self.lesions += other.lesions
        self.detected += other.detected

    def scores(self) -> dict[str, float]:
        """``dice``, ``subtle_recall`` and ``subtle_detection``; NaN where undefined."""
        per_case = torch.cat(self.dice) if self.dice else torch.zeros((0, 1))
        return {
            "dice": mean_dice_of_cases(per_case) if len(per_case) else math.nan,
            "subtle_recall": self.subtle_hits / self.subtle_voxels
            if self.subtle_voxels
            else math.nan,
            "subtle_detection": self.detected / self.lesions if self.lesions else math.nan,
        }


@dataclass
class SiteCases:
    """One PET site's test cases as both routes read them, with their subtle truth."""

    name: str
    datasets: dict[str, CaseDataset]  # "pet" / "ablation"
    truth: list[np.ndarray]  # boolean subtle masks on the patch grid, in dataset order


def score_route(
    route: RouteModel,
    dataset: CaseDataset,
    truth: Sequence[np.ndarray],
    *,
    min_overlap: float,
    device: torch.device,
) -> Tally:
    """Predict ``route`` on ``dataset`` and tally its figures against the subtle ``truth``."""
    outputs, _ = predict(route.model, dataset, route.task, device=device)
    if len(outputs) != len(dataset):
        raise SubtleLesionError(
            f"{route.route}: {len(outputs)} prediction(s) for {len(dataset)} test case(s)"
        )
    predicted = torch.as_tensor(outputs).long()
    target = torch.stack([s[label_key(route.task.name, "mask")] for s in dataset.samples])
    tally = Tally(dice=[dice_per_case(predicted, target, num_labels=route.task.num_outputs)])
    for lesion_map, subtle in zip(outputs > 0, truth, strict=True):
        if lesion_map.shape != subtle.shape:
            raise SubtleLesionError(
                f"{route.route}: prediction of shape {lesion_map.shape} but subtle mask of "
                f"shape {subtle.shape}"
            )
        tally.subtle_voxels += int(subtle.sum())
        tally.subtle_hits += int((lesion_map & subtle).sum())
        components, count = label(
            subtle, structure=generate_binary_structure(subtle.ndim, subtle.ndim)
        )
        for k in range(1, count + 1):
            hits = lesion_map[components == k]
            tally.lesions += 1
            tally.detected += int(hits.any() and hits.mean() >= min_overlap)
    return tally


def score_sites(
    sites: Sequence[SiteCases],
    routes: Mapping[str, RouteModel],
    *,
    min_overlap: float,
    device: torch.device,
) -> tuple[dict[str, Tally], dict[str, dict[str, dict[str, float]]], dict[str, int]]:
    """Score every route at every site: the pooled tallies, each site's figures and counts."""
    pooled = {key: Tally() for key in routes}
    per_site: dict[str, dict[str, dict[str, float]]] = {}
    counts = {"cases": 0, "subtle_cases": 0, "subtle_lesions": 0, "subtle_voxels": 0}
    for site in sites:
        per_site[site.name] = {}
        for key, route in routes.items():
            tally = score_route(
                route, site.datasets[key], site.truth, min_overlap=min_overlap, device=device
            )
            pooled[key].add(tally)
            per_site[site.name][key] = tally.scores()
        counts["cases"] += len(site.truth)
        counts["subtle_cases"] += sum(bool(t.any()) for t in site.truth)
    counts["subtle_lesions"] = pooled["pet"].lesions
    counts["subtle_voxels"] = pooled["pet"].subtle_voxels
    return pooled, per_site, counts
