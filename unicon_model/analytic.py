"""Closed-form (analytic) ridge heads from summed sufficient statistics.

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
import torch
from torch import Tensor, nn

from unicon_model.errors import AnalyticHeadError, ComponentError

STATISTIC_NAMES = ("count", "feature_sum", "target_sum", "gram", "cross")


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
    def from_data(cls, features: Any, targets: Any) -> RidgeStatistics:
        """Statistics of ``features`` ``(n, d)`` and ``targets`` ``(n, k)`` or ``(n,)``."""
        x = _as_float64(features)
        y = _as_float64(targets)
        if y.ndim == 1:
            y = y[:, None]
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise AnalyticHeadError(
                f"features must be (n, d) and targets (n, k) with the same n; got "
                f"{x.shape} and {y.shape}"
            )
        return cls(x.shape[0], x.sum(0), y.sum(0), x.T @ x, x.T @ y)

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
        if self.count == 0:
            raise AnalyticHeadError("no samples: every site sent empty statistics")
        if l2 < 0:
            raise AnalyticHeadError(f"l2 must be >= 0, got {l2}")
        d, k = self.shape
        gram, cross = self.gram, self.cross
        mean_x = self.feature_sum / self.count
        mean_y = self.target_sum / self.count
        if fit_intercept:
            gram = gram - self.count * np.outer(mean_x, mean_x)
            cross = cross - self.count * np.outer(mean_x, mean_y)
        system = gram + l2 * np.eye(d)
        try:
            weight = np.linalg.solve(system, cross)
        except np.linalg.LinAlgError:
            weight = np.linalg.lstsq(system, cross, rcond=None)[0]
        bias = mean_y - mean_x @ weight if fit_intercept else np.zeros(k)
        return weight, bias

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


def one_hot_targets(labels: Any, num_classes: int) -> np.ndarray:
    """One-hot float64 targets ``(n, num_classes)`` of integer labels."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise AnalyticHeadError(f"labels must lie in 0..{num_classes - 1}")
    return np.eye(num_classes, dtype=np.float64)[y]


class AnalyticHead(nn.Module):
    """A linear head whose weights are buffers solved in closed form (never by an optimiser).

    Parameters
    ----------
    in_features
        Feature dimension ``d``.
    out_features
        Number of outputs ``k`` (classes).
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``features @ weightᵀ + bias``."""
        return features @ self.weight.T.to(features.dtype) + self.bias.to(features.dtype)

    @torch.no_grad()
    def set_solution(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Install a ridge solution ``weight`` ``(d, k)``, ``bias`` ``(k,)``."""
        k, d = self.weight.shape
        if weight.shape != (d, k) or bias.shape != (k,):
            raise ComponentError(
                f"ridge solution of shapes {weight.shape}, {bias.shape} does not fit a head "
                f"of {d} features and {k} outputs (expected ({d}, {k}) and ({k},))"
            )
        self.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
        self.bias.copy_(torch.from_numpy(bias))
