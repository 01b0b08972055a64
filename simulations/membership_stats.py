"""The membership-inference statistic: the attack's AUC and its stratified bootstrap interval.

See :mod:`simulations.membership` for the attack; this module holds the arithmetic on the
per-case losses (:class:`CaseLosses`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from unicon_model.metrics.uncertainty import (
    DEFAULT_REPLICATES,
    Interval,
    bootstrap_counts,
    bootstrap_interval,
    bootstrap_seed,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseLosses:
    """Per-case losses of one site on one route: members (train) and non-members (test)."""

    member: NDArray[np.float64]
    nonmember: NDArray[np.float64]


def _win_matrix(member: NDArray[np.float64], nonmember: NDArray[np.float64]) -> NDArray[np.float64]:
    """``W[i, j] = 1`` if member ``i``'s loss is below non-member ``j``'s, 0.5 if equal."""
    m, n = member[:, None], nonmember[None, :]
    wins = (m < n).astype(np.float64) + 0.5 * (m == n)
    return np.asarray(wins, dtype=np.float64)  # numpy types float * bool array as Any


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
    member_counts: list[NDArray[np.intp]] = []
    nonmember_counts: list[NDArray[np.intp]] = []
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
