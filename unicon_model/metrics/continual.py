"""Continual-learning metrics from a stage x task results matrix.

``R[i, j]`` is the test metric (higher is better) of task ``j`` after training stage ``i``;
``introduced_at[j]`` is the stage at which task ``j`` was learned (default: task ``j`` at stage
``j``). Entries before a task's introduction may be NaN; entries from its introduction on must
be numbers. A task with ``introduced_at[j] >= n_stages`` is not learned yet and ignored.

References
----------
Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017 (ACC, BWT,
FWT). Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018 (forgetting).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "ContinualSummary",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forward_transfer",
    "summarise",
]


def _validate(
    results: ArrayLike, introduced_at: Sequence[int] | None
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Check ``R`` and ``introduced_at``; return them as arrays."""
    matrix = np.asarray(results, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"R must be a non-empty 2-D matrix of shape (n_stages, n_tasks), got {matrix.shape}"
        )
    n_stages, n_tasks = matrix.shape
    if introduced_at is None:
        stages = np.arange(n_tasks, dtype=np.int64)
    else:
        raw = np.asarray(introduced_at)
        if raw.ndim != 1 or raw.shape[0] != n_tasks:
            raise ValueError(
                f"introduced_at must give one stage per task ({n_tasks} tasks = R.shape[1]), "
                f"got shape {raw.shape}"
            )
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"introduced_at must hold integer stage indices, got {raw.dtype}")
        stages = raw.astype(np.int64)
        if (stages < 0).any():
            bad = int(np.flatnonzero(stages < 0)[0])
            raise ValueError(f"introduced_at[{bad}] = {stages[bad]} must be >= 0")
    if np.isinf(matrix).any():
        i, j = np.argwhere(np.isinf(matrix))[0]
        raise ValueError(f"R[{i}, {j}] is infinite: every entry must be a number or NaN")
    learned = np.arange(n_stages)[:, None] >= stages[None, :]
    missing = learned & np.isnan(matrix)
    if missing.any():
        i, j = np.argwhere(missing)[0]
        raise ValueError(
            f"R[{i}, {j}] is NaN but task {j} was learned at stage {stages[j]} <= {i}: "
            "evaluate every learned task after every stage"
        )
    return matrix, stages


def _mean_or_nan(values: list[float], what: str) -> float:
    if not values:
        logger.debug("%s undefined: no task qualifies", what)
        return float("nan")
    return float(np.mean(values))


def _mean_over_earlier_tasks(
    R: ArrayLike,  # noqa: N803
    introduced_at: Sequence[int] | None,
    value: Callable[[NDArray[np.float64], int, int], float],
    what: str,
) -> float:
    """Mean of ``value(R[:, j], introduced_at[j], T-1)`` over tasks introduced before T-1."""
    matrix, stages = _validate(R, introduced_at)
    last = matrix.shape[0] - 1
    return _mean_or_nan(
        [
            value(matrix[:, j], int(stages[j]), last)
            for j in range(matrix.shape[1])
            if stages[j] < last
        ],
        what,
    )


def average_accuracy(R: ArrayLike, introduced_at: Sequence[int] | None = None) -> float:  # noqa: N803
    """Average final metric, ``ACC = mean_j R[T-1, j]`` over tasks learned by the last stage.

    Parameters
    ----------
    R
        Results matrix of shape ``(n_stages, n_tasks)``.
    introduced_at
        Stage at which each task was learned; default ``[0, 1, ..., n_tasks-1]``.

    Returns
    -------
    float
        ACC, or NaN if no task is learned by the last stage.

    Raises
    ------
    ValueError
        If ``R`` is not 2-D, ``introduced_at`` has the wrong length or negative entries, or a
        learned task has a NaN (or any entry is infinite).
    """
    matrix, stages = _validate(R, introduced_at)
    last = matrix.shape[0] - 1
    return _mean_or_nan(
        [float(matrix[last, j]) for j in range(matrix.shape[1]) if stages[j] <= last], "ACC"
    )


def backward_transfer(R: ArrayLike, introduced_at: Sequence[int] | None = None) -> float:  # noqa: N803
    """Backward transfer, ``BWT = mean_j (R[T-1, j] - R[introduced_at[j], j])``.

    The mean runs over tasks introduced before the last stage; negative values mean forgetting.

    Parameters
    ----------
    R, introduced_at
        As :func:`average_accuracy`; BWT reads ``R[introduced_at[j], j]`` and ``R[T-1, j]``.

    Returns
    -------
    float
        BWT, or NaN if no task was introduced before the last stage (e.g. a single stage).

    Raises
    ------
    ValueError
        As :func:`average_accuracy`.
    """
    return _mean_over_earlier_tasks(
        R, introduced_at, lambda column, first, last: float(column[last] - column[first]), "BWT"
    )


def forward_transfer(
    R: ArrayLike,  # noqa: N803
    baseline: ArrayLike,
    introduced_at: Sequence[int] | None = None,
) -> float:
    """Forward transfer, ``FWT = mean_j (R[introduced_at[j] - 1, j] - baseline[j])``.

    The mean runs over tasks learned by the last stage with ``introduced_at[j] > 0``. It needs
    ``R`` entries *before* a task's introduction: the caller must evaluate the task's not yet
    trained head on the current backbone after stage ``introduced_at[j] - 1``, and give in
    ``baseline[j]`` the metric of a reference (e.g. a randomly initialised model). Tasks whose
    entry ``R[introduced_at[j] - 1, j]`` or ``baseline[j]`` is NaN are skipped.

    Parameters
    ----------
    R, introduced_at
        As :func:`average_accuracy`.
    baseline
        Reference metric of each task, shape ``(n_tasks,)``.

    Returns
    -------
    float
        FWT, or NaN if no task qualifies.

    Raises
    ------
    ValueError
        As :func:`average_accuracy`, or if ``baseline`` does not have shape ``(n_tasks,)``.
    """
    matrix, stages = _validate(R, introduced_at)
    reference = np.asarray(baseline, dtype=np.float64)
    if reference.shape != (matrix.shape[1],):
        raise ValueError(
            f"baseline must have shape ({matrix.shape[1]},) (one value per task), "
            f"got {reference.shape}"
        )
    last = matrix.shape[0] - 1
    gains: list[float] = []
    for j in range(matrix.shape[1]):
        if 0 < stages[j] <= last:
            gain = float(matrix[stages[j] - 1, j] - reference[j])
            if not np.isnan(gain):
                gains.append(gain)
    return _mean_or_nan(gains, "FWT")


def average_forgetting(R: ArrayLike, introduced_at: Sequence[int] | None = None) -> float:  # noqa: N803
    """Average forgetting (Chaudhry et al. 2018).

    For each task introduced before the last stage,
    ``f_j = max_{l in [introduced_at[j], T-2]} R[l, j] - R[T-1, j]``; the result is the mean.

    Parameters
    ----------
    R, introduced_at
        As :func:`average_accuracy`; forgetting reads rows ``introduced_at[j]`` to ``T-1`` of
        column ``j``.

    Returns
    -------
    float
        Mean forgetting (positive = forgotten), or NaN if no task was introduced before the
        last stage.

    Raises
    ------
    ValueError
        As :func:`average_accuracy`.
    """
    return _mean_over_earlier_tasks(
        R,
        introduced_at,
        lambda column, first, last: float(column[first:last].max() - column[last]),
        "forgetting",
    )


@dataclass(frozen=True)
class ContinualSummary:
    """All continual-learning metrics of one results matrix (NaN where undefined).

    Attributes
    ----------
    acc
        Average final metric (:func:`average_accuracy`).
    bwt
        Backward transfer (:func:`backward_transfer`).
    fwt
        Forward transfer (:func:`forward_transfer`); NaN when no baseline was given.
    forgetting
        Average forgetting (:func:`average_forgetting`).
    """

    acc: float
    bwt: float
    fwt: float
    forgetting: float


def summarise(
    R: ArrayLike,  # noqa: N803
    introduced_at: Sequence[int] | None = None,
    baseline: ArrayLike | None = None,
) -> ContinualSummary:
    """Compute every metric of :class:`ContinualSummary` for one results matrix.

    Parameters
    ----------
    R, introduced_at
        As :func:`average_accuracy`.
    baseline
        Reference metric per task for :func:`forward_transfer`; without it ``fwt`` is NaN.

    Returns
    -------
    ContinualSummary
        ACC, BWT, FWT and forgetting.

    Raises
    ------
    ValueError
        As the individual metrics.
    """
    fwt = float("nan") if baseline is None else forward_transfer(R, baseline, introduced_at)
    return ContinualSummary(
        acc=average_accuracy(R, introduced_at),
        bwt=backward_transfer(R, introduced_at),
        fwt=fwt,
        forgetting=average_forgetting(R, introduced_at),
    )
