"""Plain FedAvg: the example-weighted mean of the validated site updates."""

from __future__ import annotations

import math
from typing import Any

from server.errors import StageError
from server.round_checks import checked_replies, require_finite
from server.rounds.base import RoundContext, RoundStrategy
from server.validation import validate_updates, weighted_average
from unicon_model import protocol
from unicon_model.components import load_state, select_state
from unicon_model.schema import StageSpec


class FedAvgRound(RoundStrategy):
    """One training round: each site's trained components, validated, averaged by examples.

    A reply is refused (``rejected``) for a malformed config, a bad ``num-examples`` or an
    update that fails :func:`server.validation.validate_updates` (keys, shapes, finite,
    ``max_update_norm``); the round fails when no update is left.
    """

    name = "fedavg"

    @classmethod
    def handles(cls, stage: StageSpec) -> bool:
        """Training stages without secure aggregation."""
        return not stage.secure_aggregation and not stage.is_analytic

    def run(self, context: RoundContext) -> dict[str, Any]:
        """Send, check, average and load the round's updates; return the round record."""
        host, stage, round_ = context.host, context.stage, context.round
        request, components = host.request(context.index, round_, context.model)
        replies, malformed = host.send(
            "train", context.nodes, request, components, stage.round_timeout
        )
        reference = select_state(context.model, stage.trained_components)
        failed = {context.site(r.node_id): r.error_reason for r in replies if not r.ok}
        with host.clock.phase("update_check"):
            rejected = checked_replies(host.plan, context.index, host.sites, replies, malformed)
            candidates = [r for r in replies if r.ok and context.site(r.node_id) not in rejected]
            verdicts = validate_updates(
                {context.site(r.node_id): r.arrays for r in candidates},
                reference,
                max_norm=stage.max_update_norm,
            )
        accepted = [r for r, v in zip(candidates, verdicts, strict=True) if v.accepted]
        rejected.update({v.site: v.reason for v in verdicts if not v.accepted})
        if not accepted:
            raise StageError(
                f"stage {stage.name!r} round {round_}: no valid update "
                f"(rejected: {rejected}, failed: {failed})"
            )
        weights = [float(r.metrics[protocol.KEY_NUM_EXAMPLES]) for r in accepted]
        merged = weighted_average([r.arrays for r in accepted], weights)
        require_finite(merged, f"stage {stage.name!r} round {round_}: the merged update")
        load_state(context.model, merged, components=stage.trained_components)
        losses = [
            (float(r.metrics.get("loss", math.nan)), w)
            for r, w in zip(accepted, weights, strict=True)
        ]
        finite = [(v, w) for v, w in losses if math.isfinite(v)]
        loss = sum(v * w for v, w in finite) / sum(w for _, w in finite) if finite else math.nan
        return {
            "sites": [context.site(r.node_id) for r in accepted],
            "loss": loss,
            "site_loss": {
                context.site(r.node_id): v for r, (v, _) in zip(accepted, losses, strict=True)
            },
            "num_examples": sum(weights),
            "rejected": rejected,
            "failed": failed,
        }
