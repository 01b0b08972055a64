"""Ridge regression from summed sufficient statistics (the analytic heads' solver).

Sites compute, on frozen features ``X`` and targets ``Y``, the plain sums ``n``, ``Σx``,
``Σy``, ``XᵀX`` and ``XᵀY``. Sums merge exactly, in any order and over any split of the data
(so they can also be summed by secure aggregation), and the ridge solution from the merged
statistics equals centralised ridge regression on the pooled data, in one round, without
forgetting when more data arrives (ACIL, arXiv 2205.14922; AFL, arXiv 2405.16240).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from unicon_model.errors import AnalyticHeadError

STATISTIC_NAMES = ("count", "feature_sum", "target_sum", "gram", "cross")


@dataclass(frozen=True)
class RidgeSolution:
    """A ridge solution: ``weight`` ``(d, k)``, ``bias`` ``(k,)`` and the 2-norm condition
    number of the regularised system that was solved (``inf`` if it is singular)."""

    weight: np.ndarray
    bias: np.ndarray
    condition: float


def _condition(system: np.ndarray) -> float:
    """2-norm condition number of ``system``; ``inf`` when it is singular."""
    with np.errstate(all="ignore"):
        value = float(np.linalg.cond(system))
    return value if np.isfinite(value) else float("inf")


def _as_float64(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class RidgeStatistics:
    """Sufficient statistics of ridge regression (all float64 sums).

    Attributes
    ----------
    count
        Number of samples ``n``.
    feature_sum, target_sum
        ``Σx`` of shape ``(d,)`` and ``Σy`` of shape ``(k,)``.
    gram, cross
        ``XᵀX`` of shape ``(d, d)`` and ``XᵀY`` of shape ``(d, k)``, uncentred.
    """

    count: int
    feature_sum: np.ndarray
    target_sum: np.ndarray
    gram: np.ndarray
    cross: np.ndarray

    @classmethod
    def from_data(cls, features: Any, targets: Any, weights: Any = None) -> RidgeStatistics:
        """Statistics of ``features`` ``(n, d)`` and ``targets`` ``(n, k)`` or ``(n,)``.

        With sample ``weights`` ``(n,)`` the four sums are weighted (``Σwx``, ``Σwy``,
        ``XᵀWX``, ``XᵀWY``) and ``count`` stays the number of samples; solve such
        statistics with a bias column (:meth:`solution` ``bias_column=True``).
        """
        x = _as_float64(features)
        y = _as_float64(targets)
        if y.ndim == 1:
            y = y[:, None]
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise AnalyticHeadError(
                f"features must be (n, d) and targets (n, k) with the same n; got "
                f"{x.shape} and {y.shape}"
            )
        if weights is None:
            return cls(x.shape[0], x.sum(0), y.sum(0), x.T @ x, x.T @ y)
        w = _as_float64(weights).reshape(-1)
        if w.shape != (x.shape[0],) or not np.all(w >= 0):
            raise AnalyticHeadError(
                f"weights must be ({x.shape[0]},) and non-negative; got shape {w.shape}"
            )
        wx, wy = x * w[:, None], y * w[:, None]
        return cls(x.shape[0], wx.sum(0), wy.sum(0), wx.T @ x, wx.T @ y)

    @classmethod
    def zeros(cls, num_features: int, num_targets: int) -> RidgeStatistics:
        """The neutral element of :meth:`merge`."""
        d, k = num_features, num_targets
        return cls(0, np.zeros(d), np.zeros(k), np.zeros((d, d)), np.zeros((d, k)))

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, k)``: number of features and of targets."""
        return self.cross.shape[0], self.cross.shape[1]

    def merge(self, other: RidgeStatistics) -> RidgeStatistics:
        """Exact sum of two sets of statistics."""
        if self.shape != other.shape:
            raise AnalyticHeadError(
                f"cannot merge statistics of shape (d, k) = {self.shape} with {other.shape}"
            )
        return RidgeStatistics(
            self.count + other.count,
            self.feature_sum + other.feature_sum,
            self.target_sum + other.target_sum,
            self.gram + other.gram,
            self.cross + other.cross,
        )

    def __add__(self, other: RidgeStatistics) -> RidgeStatistics:
        return self.merge(other)

    def solve(self, *, l2: float, fit_intercept: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Ridge solution, identical to ``sklearn.linear_model.Ridge(alpha=l2)``.

        Returns
        -------
        tuple of ndarray
            ``weight`` ``(d, k)`` and ``bias`` ``(k,)``.
        """
        solution = self.solution(l2=l2, fit_intercept=fit_intercept)
        return solution.weight, solution.bias

    def solution(
        self, *, l2: float, fit_intercept: bool = True, bias_column: bool = False
    ) -> RidgeSolution:
        """Ridge solution with the condition number of the regularised system.

        Parameters
        ----------
        l2
            Ridge penalty (``>= 0``).
        fit_intercept
            Centre the statistics (unweighted sums only): the intercept is not penalised.
        bias_column
            The last feature is the constant 1: its weight is the (unpenalised) bias and
            the other weights are returned without it. This is weighted ridge with an
            intercept, ``Ridge(alpha=l2).fit(X, Y, sample_weight=w)``, on statistics of
            ``[X, 1]`` from :meth:`from_data` with ``weights``.

        Raises
        ------
        AnalyticHeadError
            No samples, or a negative ``l2``.
        """
        if self.count == 0:
            raise AnalyticHeadError("no samples: every site sent empty statistics")
        if l2 < 0:
            raise AnalyticHeadError(f"l2 must be >= 0, got {l2}")
        d, k = self.shape
        gram, cross = self.gram, self.cross
        penalty = np.full(d, float(l2))
        if bias_column:
            penalty[-1] = 0.0
        elif fit_intercept:
            mean_x = self.feature_sum / self.count
            mean_y = self.target_sum / self.count
            gram = gram - self.count * np.outer(mean_x, mean_x)
            cross = cross - self.count * np.outer(mean_x, mean_y)
        system = gram + np.diag(penalty)
        try:
            weight = np.linalg.solve(system, cross)
        except np.linalg.LinAlgError:
            weight = np.linalg.lstsq(system, cross, rcond=None)[0]
        condition = _condition(system)
        if bias_column:
            return RidgeSolution(weight[:-1], weight[-1].copy(), condition)
        bias = mean_y - mean_x @ weight if fit_intercept else np.zeros(k)
        return RidgeSolution(weight, bias, condition)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for transport (keys :data:`STATISTIC_NAMES`)."""
        return {
            "count": np.array([float(self.count)]),
            "feature_sum": self.feature_sum,
            "target_sum": self.target_sum,
            "gram": self.gram,
            "cross": self.cross,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> RidgeStatistics:
        """Parse transported statistics, reporting every problem at once."""
        problems = [f"missing {name!r}" for name in STATISTIC_NAMES if name not in arrays]
        values = {
            n: np.asarray(arrays[n], dtype=np.float64) for n in STATISTIC_NAMES if n in arrays
        }
        for name, value in values.items():
            if not np.all(np.isfinite(value)):
                problems.append(f"{name!r} has NaN or Inf")
        if "count" in values:
            count = values["count"].ravel()
            if count.size != 1 or count[0] < 0 or count[0] != round(count[0]):
                problems.append(f"'count' must be one non-negative integer, got {count}")
        if "cross" in values and values["cross"].ndim == 2:
            d, k = values["cross"].shape
            expected = {"feature_sum": (d,), "target_sum": (k,), "gram": (d, d)}
            for name, shape in expected.items():
                if name in values and values[name].shape != shape:
                    problems.append(f"{name!r} has shape {values[name].shape}, expected {shape}")
        elif "cross" in values:
            problems.append(f"'cross' must be 2-D, got shape {values['cross'].shape}")
        if problems:
            raise AnalyticHeadError("invalid ridge statistics: " + "; ".join(problems))
        return cls(
            int(values["count"].ravel()[0]),
            values["feature_sum"],
            values["target_sum"],
            values["gram"],
            values["cross"],
        )


def merge_statistics(statistics: Iterable[RidgeStatistics]) -> RidgeStatistics:
    """Sum of every site's statistics."""
    items = list(statistics)
    if not items:
        raise AnalyticHeadError("no statistics to merge")
    total = items[0]
    for item in items[1:]:
        total = total.merge(item)
    return total
