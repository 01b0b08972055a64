"""Survival metrics: Harrell's concordance index and the Cox partial-likelihood loss.

Both take a *risk* score where higher means shorter expected survival (a log hazard ratio).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["concordance_index", "cox_partial_likelihood_loss"]

# Largest number of (event row x sample) pair cells evaluated at once by ``concordance_index``.
_MAX_PAIR_CELLS = 1 << 22


def _vector(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """Return ``values`` as a 1-D float64 array without NaN, or raise naming ``name``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n,), got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN: drop or impute those samples first")
    return array


def _survival_inputs(
    time: ArrayLike, risk: ArrayLike, event: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Checked ``time``, ``risk`` and boolean ``event`` arrays of :func:`concordance_index`."""
    times = _vector(time, "time")
    risks = _vector(risk, "risk")
    events_raw = _vector(event, "event")
    if not (times.shape == risks.shape == events_raw.shape):
        raise ValueError(
            f"time, risk and event must have the same length, got {times.shape[0]}, "
            f"{risks.shape[0]} and {events_raw.shape[0]}"
        )
    if not np.all(times > 0):
        bad = int(np.flatnonzero(~(times > 0))[0])
        raise ValueError(f"time must be > 0 for every sample, got time[{bad}] = {times[bad]}")
    if not np.all((events_raw == 0) | (events_raw == 1)):
        raise ValueError("event must hold only 0 (censored) and 1 (event observed)")
    return times, risks, events_raw.astype(bool)


def concordance_index(time: ArrayLike, risk: ArrayLike, event: ArrayLike) -> float:
    """Harrell's concordance index of a risk score (higher risk = shorter survival).

    A pair ``(i, j)`` is comparable when ``i`` had the event and either ``time[i] < time[j]``,
    or ``time[i] == time[j]`` and ``j`` was censored (equal times are comparable only if exactly
    one of the two had the event). A comparable pair is concordant when ``risk[i] > risk[j]``
    and counts 0.5 when ``risk[i] == risk[j]``. The result is
    ``(concordant + 0.5 * tied) / comparable`` and equals
    ``lifelines.utils.concordance_index(time, -risk, event)``.

    The pairs are evaluated with vectorised numpy in blocks of event rows, so memory stays
    bounded (about ``2**22`` pair cells per block) for any sample size.

    Parameters
    ----------
    time
        Observed times (event or censoring), shape ``(n,)``, all ``> 0``.
    risk
        Predicted risk scores, shape ``(n,)``.
    event
        Event indicators, shape ``(n,)``: 1 (or True) if the event was observed, 0 if censored.

    Returns
    -------
    float
        The C-index in ``[0, 1]``; 0.5 is random ranking.

    Raises
    ------
    ValueError
        If lengths differ, an input contains NaN, a time is not ``> 0``, ``event`` is not 0/1,
        or no pair is comparable (e.g. no events).
    """
    times, risks, events = _survival_inputs(time, risk, event)
    event_rows = np.flatnonzero(events)
    censored = ~events
    block = max(1, _MAX_PAIR_CELLS // max(1, times.shape[0]))
    num_pairs = 0
    num_correct = 0
    num_tied = 0
    for start in range(0, event_rows.shape[0], block):
        rows = event_rows[start : start + block]
        row_time = times[rows, None]
        row_risk = risks[rows, None]
        comparable = (times[None, :] > row_time) | ((times[None, :] == row_time) & censored)
        num_pairs += int(np.count_nonzero(comparable))
        num_correct += int(np.count_nonzero(comparable & (row_risk > risks[None, :])))
        num_tied += int(np.count_nonzero(comparable & (row_risk == risks[None, :])))
    if num_pairs == 0:
        raise ValueError(
            "no comparable pair: the C-index needs at least one event whose time is below "
            "another sample's time (or equal to a censored one)"
        )
    return (num_correct + num_tied / 2) / num_pairs


def cox_partial_likelihood_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative log Cox partial likelihood (Breslow ties), averaged over the events.

    ``loss = -(1 / n_events) * sum_{i: event_i} [risk_i - log sum_{j: time_j >= time_i}
    exp(risk_j)]``; the inner sum is a log-sum-exp over the risk set, computed with
    :func:`torch.logcumsumexp` after sorting by time, so it is stable for large risks and runs
    in ``O(n log n)``.

    Parameters
    ----------
    risk
        Predicted log hazard ratios, shape ``(n,)`` or ``(n, 1)``; gradients flow through it.
    time
        Observed times, shape ``(n,)``.
    event
        Event indicators, shape ``(n,)``: 1 (or True) if observed, 0 if censored.

    Returns
    -------
    Tensor
        Scalar loss. With no event in the batch it is ``risk.sum() * 0``: zero, but still
        connected to the graph so ``backward()`` works.

    Raises
    ------
    ValueError
        If shapes differ, the batch is empty, or ``event`` holds values other than 0/1.
    """
    scores = risk.reshape(-1) if risk.ndim == 2 and risk.shape[1] == 1 else risk
    if scores.ndim != 1 or time.ndim != 1 or event.ndim != 1:
        raise ValueError(
            "risk must have shape (n,) or (n, 1) and time, event shape (n,); got "
            f"{tuple(risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}"
        )
    if not (scores.shape[0] == time.shape[0] == event.shape[0]) or scores.shape[0] == 0:
        raise ValueError(
            "risk, time and event must have the same non-zero length, got "
            f"{scores.shape[0]}, {time.shape[0]} and {event.shape[0]}"
        )
    if bool(((event != 0) & (event != 1)).any()):
        raise ValueError("event must hold only 0 (censored) and 1 (event observed)")
    observed = event.to(device=scores.device, dtype=torch.bool)
    n_events = int(observed.sum())
    if n_events == 0:
        logger.debug("cox_partial_likelihood_loss: no event in the batch, loss is 0")
        return risk.sum() * 0

    times = time.detach().to(device=scores.device)
    order = torch.argsort(times, descending=True, stable=True)
    sorted_scores = scores[order]
    descending_times = times[order]
    # log sum_{k <= m} exp(score_k) over samples sorted by decreasing time.
    log_cumulative = torch.logcumsumexp(sorted_scores, dim=0)
    # The risk set of position m ends at the last position whose time is >= its time (ties
    # included, Breslow); -time is ascending, so searchsorted(right=True) finds that end.
    ascending = (-descending_times).contiguous()
    last = torch.searchsorted(ascending, ascending, right=True) - 1
    log_partial = sorted_scores - log_cumulative[last]
    return -(log_partial[observed[order]].sum() / n_events)
