"""Checks of site updates before aggregation.

A site's update is rejected, with the reason logged, if it holds NaN/Inf, keys outside the
stage's trained components or missing ones, wrong shapes or dtypes, if its distance from the
global model values it was sent (the L2 norm of the change) exceeds the stage's absolute
bound ``max_update_norm`` (applies at any cohort size, even 1 or 2 sites), or if that
distance is far outside the cohort's (robust rule, 3 or more sites: above the median plus
``k`` median absolute deviations, scaled to be consistent with the standard deviation, and
above ``min_ratio`` times the median). The rest are aggregated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826
"""Scale making the median absolute deviation consistent with the standard deviation."""


@dataclass(frozen=True)
class Verdict:
    """Whether one site's update is accepted, and why not."""

    site: str
    accepted: bool
    reason: str = ""
    norm: float = math.nan


def structural_problems(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> list[str]:
    """Every structural problem of ``update`` against the expected ``reference`` tensors."""
    problems = []
    unexpected = sorted(set(update) - set(reference))
    missing = sorted(set(reference) - set(update))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    for key in sorted(set(update) & set(reference)):
        value, expected = update[key], reference[key]
        if tuple(value.shape) != tuple(expected.shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(expected.shape)}")
        elif value.dtype != expected.dtype:
            problems.append(f"{key}: dtype {value.dtype}, expected {expected.dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{key}: contains NaN or Inf")
    return problems


def update_norm(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """L2 norm of ``update - reference`` over all floating-point tensors."""
    total = 0.0
    for key, value in update.items():
        if value.is_floating_point():
            total += float((value.double() - reference[key].double()).square().sum())
    return math.sqrt(total)


def _bounded_norms(
    updates: Mapping[str, Mapping[str, Tensor]],
    reference: Mapping[str, Tensor],
    max_norm: float,
    verdicts: dict[str, Verdict],
) -> dict[str, float]:
    """Norms of the updates that pass the structure checks and the absolute bound.

    A verdict rejecting each other update is put in ``verdicts``.
    """
    norms: dict[str, float] = {}
    for site, update in updates.items():
        problems = structural_problems(update, reference)
        if problems:
            verdicts[site] = Verdict(site, False, "; ".join(problems))
            continue
        norm = update_norm(update, reference)
        if not norm <= max_norm:  # also refuses a NaN norm (an overflow)
            verdicts[site] = Verdict(
                site,
                False,
                f"update norm {norm:.4g} exceeds the stage's max_update_norm {max_norm:g} "
                "(L2 distance from the global model values sent)",
                norm,
            )
        else:
            norms[site] = norm
    return norms


def _reject_outliers(
    norms: Mapping[str, float],
    mad_threshold: float,
    min_ratio: float,
    verdicts: dict[str, Verdict],
) -> None:
    """Put in ``verdicts`` a rejection of each norm far outside the cohort's (robust rule)."""
    values = np.array(list(norms.values()))
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * MAD_TO_SIGMA
    limit = max(median + mad_threshold * mad, min_ratio * median) + 1e-12
    for site, norm in norms.items():
        if norm > limit:
            verdicts[site] = Verdict(
                site,
                False,
                f"update norm {norm:.4g} is far outside the cohort (median {median:.4g}; "
                f"limit max(median + {mad_threshold:g}·MAD, {min_ratio:g}·median) "
                f"= {limit:.4g})",
                norm,
            )


def validate_updates(
    updates: Mapping[str, Mapping[str, Tensor]],
    reference: Mapping[str, Tensor],
    *,
    mad_threshold: float = 5.0,
    min_ratio: float = 3.0,
    min_cohort: int = 3,
    max_norm: float = math.inf,
) -> list[Verdict]:
    """Accept or reject each site's update.

    Parameters
    ----------
    updates
        Site name -> returned tensors.
    reference
        The global model's tensors of the trained components (what was sent).
    mad_threshold
        ``k`` of the robust outlier rule on update norms.
    min_ratio
        A norm is only "far outside" when it also exceeds ``min_ratio`` times the median:
        with a handful of non-IID sites the MAD is tiny and honest sites differ by tens of
        percent, so the spread rule alone would reject them.
    min_cohort
        The cohort rule applies only with at least this many updates that pass the structure
        checks and the absolute bound.
    max_norm
        Absolute bound on an update's norm (the stage's ``max_update_norm``), applied
        whatever the cohort size; updates above it do not enter the cohort statistics.

    Returns
    -------
    list of Verdict
        One per site, in the order of ``updates``.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    verdicts: dict[str, Verdict] = {}
    norms = _bounded_norms(updates, reference, max_norm, verdicts)
    if len(norms) >= min_cohort:
        _reject_outliers(norms, mad_threshold, min_ratio, verdicts)
    for site, norm in norms.items():
        verdicts.setdefault(site, Verdict(site, True, "", norm))
    result = [verdicts[site] for site in updates]
    for verdict in result:
        if not verdict.accepted:
            logger.warning("rejected the update of %s: %s", verdict.site, verdict.reason)
    return result


def weighted_average(
    updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Sample-weighted mean of updates (FedAvg), computed in float64, cast back.

    Non-floating tensors (counters) are taken from the first update.

    Raises
    ------
    ValueError
        Without updates, with a weight count that differs from the update count, or with a
        weight that is not a finite number > 0.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"every weight must be a finite number > 0, got {bad[:3]}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights must sum to a positive number")
    merged = {}
    for key, first in updates[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc += update[key].double() * (weight / total)
        merged[key] = acc.to(first.dtype)
    return merged
