"""Closed-form (analytic) ridge heads from summed sufficient statistics.

The statistics and their ridge solution live in :mod:`unicon_model.ridge` (re-exported
here); this module holds the heads solved from them and the per-voxel statistics of the
analytic segmentation head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from unicon_model.errors import AnalyticHeadError, ComponentError
from unicon_model.ridge import (
    STATISTIC_NAMES,
    RidgeSolution,
    RidgeStatistics,
    merge_statistics,
)

__all__ = [
    "STATISTIC_NAMES",
    "AnalyticHead",
    "AnalyticSegmentationHead",
    "RidgeHead",
    "RidgeSolution",
    "RidgeStatistics",
    "merge_statistics",
    "one_hot_targets",
    "segmentation_statistics",
    "voxel_class_weights",
]


def one_hot_targets(labels: Any, num_classes: int) -> np.ndarray:
    """One-hot float64 targets ``(n, num_classes)`` of integer labels."""
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise AnalyticHeadError(f"labels must lie in 0..{num_classes - 1}")
    return np.eye(num_classes, dtype=np.float64)[y]


def samples_per_case(kind: str, patch_size: Sequence[int]) -> float:
    """How many statistics samples one case adds to an analytic head's ``count``.

    A segmentation head counts every voxel of the patch (``prod(patch_size)``), any other
    head one sample per case. The one rule both the sites (which scale the count down
    before SecAgg+) and the coordinator (which bounds and restores it) use.
    """
    return float(math.prod(patch_size)) if kind == "segmentation" else 1.0


def voxel_class_weights(
    num_labels: int, foreground_prior: float, *, class_balance: bool = True
) -> np.ndarray:
    """Fixed per-class voxel weights of an analytic segmentation head.

    With ``class_balance`` and ``p = foreground_prior`` the background weighs
    ``1 / (2 (1 - p))`` and every label ``1 / (2 p)`` (the ratio ``(1 - p) / p`` of
    weighting background by ``p`` and labels by ``1 - p``, scaled so that a case whose
    foreground fraction is ``p`` has total weight 1, half background and half foreground):
    a small lesion is not swamped by background, and ``l2`` keeps the scale it has for a
    classification head (one case, one unit of weight; the per-voxel weights are divided
    by the case's voxels, see :func:`segmentation_statistics`). The weights come from the
    plan, never from a site's data: weights from each site's own class frequencies would
    differ between a split and the pooled data, and the summed statistics would no longer
    equal the pooled ones. Without ``class_balance`` every voxel weighs 1.
    """
    if not class_balance:
        return np.ones(num_labels)
    p = foreground_prior
    return np.array([0.5 / (1.0 - p)] + [0.5 / p] * (num_labels - 1))


def segmentation_statistics(
    voxel_features: Tensor,
    masks: Tensor,
    class_weights: np.ndarray,
    *,
    chunk: int = 65536,
) -> RidgeStatistics:
    """Weighted ridge statistics of a per-voxel head, over ``z = [features, 1]``.

    Parameters
    ----------
    voxel_features
        ``(B, d, *spatial)`` features of every voxel.
    masks
        ``(B, *spatial)`` integer label maps in ``0..K-1``, ``K = len(class_weights)``.
    class_weights
        Weight of a voxel of each label (:func:`voxel_class_weights`); each case's weights
        are divided by its number of voxels, so a case weighs like one classification
        sample and ``l2`` keeps its meaning.
    chunk
        Voxels per float64 product (bounds the memory).

    Returns
    -------
    RidgeStatistics
        ``count`` voxels; sums weighted (see :meth:`RidgeStatistics.from_data`), of
        shape ``(d + 1, K)``: solve them with ``bias_column=True``.
    """
    b, d = voxel_features.shape[:2]
    k = len(class_weights)
    if masks.shape != (b, *voxel_features.shape[2:]):
        raise AnalyticHeadError(
            f"masks of shape {tuple(masks.shape)} do not match features "
            f"{tuple(voxel_features.shape)} (expected (B, *spatial))"
        )
    labels = masks.detach().cpu().long().reshape(b, -1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise AnalyticHeadError(f"mask values must lie in 0..{k - 1}")
    x = voxel_features.detach().cpu().double().movedim(1, -1).reshape(b, -1, d)
    voxels = labels.shape[1]
    table = torch.as_tensor(np.asarray(class_weights, dtype=np.float64)) / max(voxels, 1)
    eye = torch.eye(k, dtype=torch.float64)
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(d + 1, k, dtype=torch.float64)
    feature_sum = torch.zeros(d + 1, dtype=torch.float64)
    target_sum = torch.zeros(k, dtype=torch.float64)
    for i in range(b):
        for start in range(0, voxels, chunk):
            part = labels[i, start : start + chunk]
            z = torch.cat([x[i, start : start + chunk], torch.ones(len(part), 1).double()], 1)
            w = table[part][:, None]
            y = eye[part]
            wz = z * w
            gram += wz.T @ z
            cross += wz.T @ y
            feature_sum += wz.sum(0)
            target_sum += (y * w).sum(0)
    return RidgeStatistics(
        b * voxels, feature_sum.numpy(), target_sum.numpy(), gram.numpy(), cross.numpy()
    )


class RidgeHead(nn.Module):
    """A linear head whose weights are buffers solved in closed form (never by an optimiser).

    Parameters
    ----------
    in_features
        Feature dimension ``d``.
    out_features
        Number of outputs ``k`` (classes or labels).
    """

    weight: Tensor
    bias: Tensor

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features))

    @property
    def statistics_shape(self) -> tuple[int, int]:
        """``(d, k)`` of the statistics a site sends for this head."""
        k, d = self.weight.shape
        return d, k

    def solve(self, statistics: RidgeStatistics, *, l2: float) -> RidgeSolution:
        """Ridge solution of ``statistics`` (centred: an unpenalised intercept)."""
        return statistics.solution(l2=l2)

    def stored_statistics(self) -> RidgeStatistics | None:
        """The cumulative statistics kept with the head; ``None``: it keeps none."""
        return None

    def _store(self, statistics: RidgeStatistics) -> None:
        """Keep ``statistics`` with the head (heads that keep none ignore them)."""

    def fit(
        self, statistics: RidgeStatistics, *, l2: float, accumulate: bool = False
    ) -> RidgeSolution:
        """Solve ``statistics`` (plus the stored ones if ``accumulate``) and install it.

        Raises
        ------
        AnalyticHeadError
            Wrong shape, no samples, ``accumulate`` on a head that keeps no statistics, or
            a non-finite solution.
        """
        if statistics.shape != self.statistics_shape:
            raise AnalyticHeadError(
                f"statistics of shape (d, k) = {statistics.shape} do not fit this head's "
                f"{self.statistics_shape}"
            )
        if accumulate:
            stored = self.stored_statistics()
            if stored is None:
                raise AnalyticHeadError("this analytic head keeps no statistics to add to")
            statistics = stored + statistics
        solution = self.solve(statistics, l2=l2)
        if not (np.all(np.isfinite(solution.weight)) and np.all(np.isfinite(solution.bias))):
            raise AnalyticHeadError(
                f"the ridge solution is not finite (condition number {solution.condition:.3g})"
            )
        self.set_solution(solution.weight, solution.bias)
        self._store(statistics)
        return solution

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


class AnalyticHead(RidgeHead):
    """The analytic classification head: linear on the pooled features.

    Parameters
    ----------
    in_features
        Feature dimension ``d``.
    out_features
        Number of outputs ``k`` (classes).
    """

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``features @ weightᵀ + bias``."""
        return features @ self.weight.T.to(features.dtype) + self.bias.to(features.dtype)


VOXEL_EXTRAS = ("context", "intensity", "squares")
"""Parameter-free voxel features an analytic segmentation head may add to the pyramid, in
the order they are built (see :class:`AnalyticSegmentationHead`)."""


class AnalyticSegmentationHead(RidgeHead):
    """Per-voxel ridge head over the frozen feature pyramid (incremental, closed form).

    Every voxel's feature is the concatenation of every encoder level upsampled to the
    finest level (linear interpolation, no parameters), then the parameter-free extras that
    ``extras`` names, in this order: ``context``, the pyramid's mean over the voxel's
    ``3^d`` neighbourhood; ``intensity``, the route's first input image and its ``3^d`` mean
    (the encoder normalises contrast away that a lesion is defined by); ``squares``, the
    square of each feature so far (a diagonal second-order expansion: the score can then
    pick an intensity *band*, which no linear function of the features can). Last come
    ``random_features`` fixed random features ``tanh(P f + c)`` of the pyramid (``P``, ``c``
    seeded and frozen, buffers of the head). The logits are linear in all of it, one output
    per label; the prediction is their argmax. The head also keeps the cumulative
    statistics it was solved from (buffers ``stats_*``, float64), so statistics of new
    sites or cases can be added later (:meth:`fit` with ``accumulate``) without the old
    data.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    widths
        Encoder widths (the voxel feature has ``sum(widths) + random_features`` values).
    out_features
        Number of labels including background.
    random_features
        Number of fixed random features (0: none).
    extras
        Parameter-free voxel features beyond the pyramid: any of :data:`VOXEL_EXTRAS`.
    """

    projection: Tensor
    projection_bias: Tensor
    stats_count: Tensor
    stats_feature_sum: Tensor
    stats_target_sum: Tensor
    stats_gram: Tensor
    stats_cross: Tensor

    def __init__(
        self,
        spatial_dims: int,
        widths: Sequence[int],
        out_features: int,
        *,
        random_features: int = 0,
        extras: Sequence[str] = (),
    ) -> None:
        unknown = sorted(set(extras) - set(VOXEL_EXTRAS))
        if unknown:
            raise ComponentError(f"unknown voxel features {unknown}; known: {list(VOXEL_EXTRAS)}")
        base = sum(widths)
        self.extras = tuple(e for e in VOXEL_EXTRAS if e in extras)
        derived = base * (1 + ("context" in self.extras)) + 2 * ("intensity" in self.extras)
        derived *= 1 + ("squares" in self.extras)
        super().__init__(derived + random_features, out_features)
        self.spatial_dims = spatial_dims
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"
        self.pyramid_features = base
        self.random_features = random_features
        if random_features:
            self.register_buffer("projection", torch.randn(random_features, base) / math.sqrt(base))
            self.register_buffer("projection_bias", torch.randn(random_features))
        d, k = derived + random_features + 1, out_features
        f64 = torch.float64
        self.register_buffer("stats_count", torch.zeros(1, dtype=f64))
        self.register_buffer("stats_feature_sum", torch.zeros(d, dtype=f64))
        self.register_buffer("stats_target_sum", torch.zeros(k, dtype=f64))
        self.register_buffer("stats_gram", torch.zeros(d, d, dtype=f64))
        self.register_buffer("stats_cross", torch.zeros(d, k, dtype=f64))

    @property
    def statistics_shape(self) -> tuple[int, int]:
        """``(d + 1, k)``: the voxel features and the bias column, by the labels."""
        d, k = super().statistics_shape
        return d + 1, k

    def _local_mean(self, x: Tensor) -> Tensor:
        """The mean over each voxel's ``3^d`` neighbourhood (zero padding counted)."""
        pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d
        return pool(x, 3, stride=1, padding=1)

    def voxel_features(self, features: list[Tensor], image: Tensor | None = None) -> Tensor:
        """``(B, d, *spatial)``: every level upsampled to the finest, the extras, then random
        features (see the class doc). ``image``: the route's input ``(B, C, *spatial)``,
        needed by the ``intensity`` extra.

        Raises
        ------
        ComponentError
            If the pyramid has other channels than the head's, or ``intensity`` lacks
            ``image`` (or its size is not the finest level's).
        """
        size = features[0].shape[2:]
        levels = [features[0]] + [
            F.interpolate(f, size=size, mode=self.mode, align_corners=False) for f in features[1:]
        ]
        pyramid = torch.cat(levels, dim=1)
        if pyramid.shape[1] != self.pyramid_features:
            raise ComponentError(
                f"the analytic segmentation head expects {self.pyramid_features} pyramid "
                f"channels, got {pyramid.shape[1]}"
            )
        parts = [pyramid]
        if "context" in self.extras:
            parts.append(self._local_mean(pyramid))
        if "intensity" in self.extras:
            if image is None or image.shape[2:] != size:
                raise ComponentError(
                    "the analytic segmentation head's `intensity` feature needs the route's "
                    f"input image at the finest level's size {tuple(size)}"
                )
            first = image[:, :1].to(pyramid.dtype)
            parts += [first, self._local_mean(first)]
        x = torch.cat(parts, dim=1)
        if "squares" in self.extras:
            x = torch.cat([x, x * x], dim=1)
        if self.random_features:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            projected = torch.einsum("bd...,rd->br...", pyramid, self.projection.to(x.dtype))
            x = torch.cat([x, torch.tanh(projected + self.projection_bias.view(shape))], dim=1)
        return x

    def forward(
        self, features: list[Tensor], clinical: Tensor | None = None, image: Tensor | None = None
    ) -> Tensor:
        """Per-voxel logits ``(B, labels, *spatial)`` of the feature pyramid (and ``image``,
        the route's input, for the ``intensity`` extra)."""
        z = self.voxel_features(features, image)
        logits = torch.einsum("bd...,kd->bk...", z, self.weight.to(z.dtype))
        return logits + self.bias.to(z.dtype).view((1, -1) + (1,) * (z.ndim - 2))

    def solve(self, statistics: RidgeStatistics, *, l2: float) -> RidgeSolution:
        """Weighted ridge with an unpenalised bias (the statistics' last feature is 1)."""
        return statistics.solution(l2=l2, bias_column=True)

    def stored_statistics(self) -> RidgeStatistics:
        """The cumulative statistics the head was last solved from (zeros at first)."""
        return RidgeStatistics(
            round(float(self.stats_count[0])),
            self.stats_feature_sum.detach().cpu().numpy().copy(),
            self.stats_target_sum.detach().cpu().numpy().copy(),
            self.stats_gram.detach().cpu().numpy().copy(),
            self.stats_cross.detach().cpu().numpy().copy(),
        )

    @torch.no_grad()
    def _store(self, statistics: RidgeStatistics) -> None:
        for name, value in statistics.to_arrays().items():
            buffer = getattr(self, f"stats_{name}")
            buffer.copy_(torch.from_numpy(np.asarray(value, dtype=np.float64)))
