"""The message format between coordinator and sites, written down in one place.

Flower carries three records per message; this module names their keys and converts the
plain-Python parts. It never imports Flower: the ServerApp and ClientApp adapters put these
values into ``ArrayRecord`` / ``ConfigRecord`` / ``MetricRecord``.

Requests (server -> site), message types ``query``, ``train``, ``evaluate``:

``config`` (ConfigRecord)
    ``plan`` the plan as JSON; ``stage`` the stage name (the model is grown through it);
    ``server-round``; ``run`` a key identifying the run (replays with the same run, stage,
    round and model are answered from the site's store, not retrained); ``digests`` JSON
    ``{component: sha256}`` of every component the site needs; ``split`` (evaluate).
``arrays`` (ArrayRecord)
    State-dict entries of the needed components the site is not known to hold; the rest it
    takes from its component cache by digest.

Replies (site -> server):

``arrays``
    Train: only the stage's trained components, or analytic statistics
    (``<task>/<statistic>``).
``metrics`` (MetricRecord)
    ``num-examples`` and training or evaluation metrics (``<task>@<modality>/<metric>``).
``config``
    ``site``, ``epsilon`` (JSON: spent so far at the site's delta), ``cached`` (JSON list of
    component digests the site now holds), ``capabilities`` (query: JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unicon_model.errors import UniconModelError
from unicon_model.schema import Plan, validate_plan

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

KEY_PLAN = "plan"
KEY_STAGE = "stage"
KEY_ROUND = "server-round"
KEY_RUN = "run"
KEY_DIGESTS = "digests"
KEY_SPLIT = "split"
KEY_SITE = "site"
KEY_EPSILON = "epsilon"
KEY_CACHED = "cached"
KEY_CAPABILITIES = "capabilities"
KEY_NUM_EXAMPLES = "num-examples"
KEY_ERROR = "error"

KEY_SECAGG_SEND_KEYS = "secagg-send-keys"
"""Secure-round config: JSON list naming the arrays of the request, in order."""
KEY_SECAGG_REPLY_KEYS = "secagg-reply-keys"
"""Secure-round config: JSON list naming the arrays the site returns, in order."""
KEY_SECAGG_CLIPPED = "secagg-clipped"
"""Secure-round reply metric: values the site had to clip to SecAgg+'s range."""

STATISTICS_SEPARATOR = "/"
"""Analytic statistics travel as ``<task>/<statistic>`` array keys."""


class ProtocolError(UniconModelError):
    """A message lacks a field or holds a value of the wrong type."""


def metric_key(task: str, modality: str, metric: str) -> str:
    """Evaluation metric key ``<task>@<modality>/<metric>``."""
    return f"{task}@{modality}/{metric}"


def parse_metric_key(key: str) -> tuple[str, str, str] | None:
    """Inverse of :func:`metric_key`; ``None`` for keys of another form."""
    column, sep, metric = key.partition("/")
    task, at, modality = column.partition("@")
    if not sep or not at or not task or not modality or not metric:
        return None
    return task, modality, metric


@dataclass(frozen=True)
class StageRequest:
    """The plain content of a train or evaluate request's config."""

    plan: Plan
    stage: str
    server_round: int
    run: str
    digests: dict[str, str]
    split: str = "train"

    @property
    def stage_index(self) -> int:
        """Index of the stage in the plan."""
        return self.plan.stage_names.index(self.stage)

    def to_config(self) -> dict[str, Any]:
        """Values for the request's ConfigRecord."""
        return {
            KEY_PLAN: self.plan.model_dump_json(),
            KEY_STAGE: self.stage,
            KEY_ROUND: self.server_round,
            KEY_RUN: self.run,
            KEY_DIGESTS: json.dumps(self.digests, sort_keys=True),
            KEY_SPLIT: self.split,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StageRequest:
        """Parse a request's config, naming every missing or invalid field.

        Raises
        ------
        ProtocolError
            Listing all problems.
        """
        problems = [
            f"config field {key!r} is missing"
            for key in (KEY_PLAN, KEY_STAGE, KEY_ROUND, KEY_RUN, KEY_DIGESTS)
            if key not in config
        ]
        if problems:
            raise ProtocolError("; ".join(problems))
        try:
            plan = validate_plan(json.loads(str(config[KEY_PLAN])), source="request config")
            digests = json.loads(str(config[KEY_DIGESTS]))
        except (ValueError, UniconModelError) as e:
            raise ProtocolError(f"invalid request config: {e}") from e
        stage = str(config[KEY_STAGE])
        if stage not in plan.stage_names:
            raise ProtocolError(f"stage {stage!r} is not in plan {plan.name!r}")
        if not isinstance(digests, dict):
            raise ProtocolError("config field 'digests' must be a JSON object")
        return cls(
            plan=plan,
            stage=stage,
            server_round=int(config[KEY_ROUND]),
            run=str(config[KEY_RUN]),
            digests={str(k): str(v) for k, v in digests.items()},
            split=str(config.get(KEY_SPLIT, "train")),
        )


ERROR_REFUSED = 4001
"""Error code: the site's policy or budget refuses the request (reason in the error)."""
ERROR_CACHE_MISS = 4002
"""Error code: components referenced by digest are not cached; reason is a JSON list."""
ERROR_INVALID = 4003
"""Error code: the request is malformed (missing config field, unknown stage...)."""
ERROR_SITE = 4004
"""Error code: the site failed to serve the request (data, training); reason explains."""
