"""The best-validated round of a stage: ``keep_best``, ``patience`` and their resume state."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from server.round_checks import as_number

logger = logging.getLogger(__name__)


@dataclass
class BestRound:
    """The best-validated round of the stage in progress (``keep_best`` and ``patience``).

    Attributes
    ----------
    round, score
        The best round and its validation score (``None`` before a round scored).
    since
        Validations since the best one that did not improve on it.
    state
        The best round's global model (a copy), if kept.
    """

    round: int | None = None
    score: float | None = None
    since: int = 0
    state: dict[str, Tensor] | None = None

    def to_metrics(self) -> dict[str, float]:
        """The tracking state as lineage metrics of the round checkpoint (resume)."""
        if self.round is None or self.score is None:
            return {"val/since_best": float(self.since)}
        return {
            "val/best_round": float(self.round),
            "val/best_score": self.score,
            "val/since_best": float(self.since),
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> BestRound:
        """Inverse of :meth:`to_metrics` (no state; a missing or bad entry starts afresh)."""
        since = as_number(metrics.get("val/since_best"))
        best = cls(since=int(since) if since is not None and 0 <= since < 1e9 else 0)
        round_, score = (
            as_number(metrics.get("val/best_round")),
            as_number(metrics.get("val/best_score")),
        )
        if round_ is not None and score is not None and math.isfinite(score) and round_ >= 1:
            best.round, best.score = int(round_), score
        return best

    def update(self, round_: int, score: float | None, min_delta: float) -> bool:
        """Count a validation; return whether ``round_`` is the new best (to keep).

        The kept round is the latest with the highest score (a tie keeps the later, longer
        trained round). ``since`` counts the validations in a row that did not beat the
        best score by more than ``min_delta`` (a tie or a small gain counts, for patience).
        """
        if score is None or not math.isfinite(score):
            return False  # nothing reported: neither an improvement nor a miss
        self.since = 0 if self.score is None or score > self.score + min_delta else self.since + 1
        if self.score is None or score >= self.score:
            self.round, self.score = round_, score
            return True
        return False

    def restore(self, model: nn.Module, last_round: int, stage: str) -> int:
        """Load the best round's kept model into ``model`` (``keep_best``); the kept round.

        Nothing is loaded (and ``last_round`` is kept) without a kept model or when the best
        round is the last one.
        """
        if self.state is None or self.round == last_round:
            return last_round
        model.load_state_dict(self.state)
        kept = int(self.round or last_round)
        logger.info(
            "stage %s: committing round %d (validation score %.4f), not the last round %d",
            stage,
            kept,
            self.score,
            last_round,
        )
        return kept


def kept_metrics(kept: int, best: BestRound) -> dict[str, float]:
    """Lineage metrics naming the committed round (and its validation score)."""
    metrics = {"val/kept_round": float(kept)}
    if best.round == kept and best.score is not None:
        metrics["val/score"] = best.score
    return metrics
