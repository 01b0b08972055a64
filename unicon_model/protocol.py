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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from unicon_model.errors import UniconModelError
from unicon_model.names import (
    UnsafeNameError,
    check_component_name,
    check_digest,
    check_name,
    is_valid_name,
)
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


SPLITS = ("train", "val", "test")
"""The data splits a request may name (train requests use ``train``)."""


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
        """Parse a request's config, naming every missing or invalid field at once.

        Every value that the site later turns into a path is checked against the one name
        rule of :mod:`unicon_model.names`: ``run`` and ``stage`` with
        :func:`~unicon_model.names.check_name`, the component names of ``digests`` with
        :func:`~unicon_model.names.check_component_name` and their values with
        :func:`~unicon_model.names.check_digest`. ``split`` must be one of :data:`SPLITS` and
        ``server-round`` an integer >= 1 for a train request (>= 0 for evaluation, which the
        coordinator sends as round 0). JSON nested deeper than the decoder allows is a
        protocol error, never a ``RecursionError``.

        Raises
        ------
        ProtocolError
            Listing all problems.
        """
        missing = [
            f"config field {key!r} is missing"
            for key in (KEY_PLAN, KEY_STAGE, KEY_ROUND, KEY_RUN, KEY_DIGESTS)
            if key not in config
        ]
        if missing:
            raise ProtocolError("; ".join(missing))
        problems: list[str] = []
        plan = _request_plan(config, problems)
        stage = config[KEY_STAGE]
        _collect(problems, lambda: check_name(stage, f"config field {KEY_STAGE!r}:"))
        if plan is not None and is_valid_name(stage) and stage not in plan.stage_names:
            problems.append(
                f"config field {KEY_STAGE!r}: stage {stage!r} is not in plan {plan.name!r} "
                f"(stages: {plan.stage_names})"
            )
        run = config[KEY_RUN]
        _collect(problems, lambda: check_name(run, f"config field {KEY_RUN!r}:"))
        split = config.get(KEY_SPLIT, "train")
        if split not in SPLITS:
            problems.append(f"config field {KEY_SPLIT!r} must be one of {SPLITS}, got {split!r}")
        server_round = _request_round(config, split, problems)
        digests = _request_digests(config, problems)
        if problems:
            raise ProtocolError(
                f"invalid request config ({len(problems)} problem(s)):\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        assert plan is not None and server_round is not None
        return cls(
            plan=plan,
            stage=str(stage),
            server_round=server_round,
            run=str(run),
            digests=digests,
            split=str(split),
        )


def _request_plan(config: Mapping[str, Any], problems: list[str]) -> Plan | None:
    """The plan of a request's config, or None after appending why it is not valid."""
    try:
        return validate_plan(_json_field(config, KEY_PLAN), source="request config")
    except ProtocolError as e:
        problems.append(str(e))
    except (ValueError, TypeError, UniconModelError) as e:
        problems.append(f"config field {KEY_PLAN!r} is not a valid plan: {e}")
    except RecursionError:
        problems.append(f"config field {KEY_PLAN!r} is nested too deeply")
    return None


def _request_round(config: Mapping[str, Any], split: Any, problems: list[str]) -> int | None:
    """The server round of a request's config, or None after appending why it is not valid."""
    # evaluation requests carry round 0 (after the stage); training rounds count from 1
    first = 1 if split == "train" else 0
    server_round = _round_number(config[KEY_ROUND], first)
    if server_round is None:
        problems.append(
            f"config field {KEY_ROUND!r} must be an integer >= {first}"
            f"{' for a train request' if first else ''}, got {config[KEY_ROUND]!r}"
        )
    return server_round


def _request_digests(config: Mapping[str, Any], problems: list[str]) -> dict[str, str]:
    """The valid ``component: digest`` entries of a request's config; problems appended."""
    digests: dict[str, str] = {}
    try:
        raw_digests = _json_field(config, KEY_DIGESTS)
    except ProtocolError as e:
        problems.append(str(e))
        return digests
    if not isinstance(raw_digests, dict):
        problems.append(f"config field {KEY_DIGESTS!r} must be a JSON object")
        return digests
    where = f"config field {KEY_DIGESTS!r}"
    for component, digest in raw_digests.items():
        ok = _collect(problems, partial(check_component_name, component), f"{where}: ")
        ok &= _collect(problems, partial(check_digest, digest, f"{where}[{component!r}]:"))
        if ok:
            digests[component] = digest
    return digests


def _json_field(config: Mapping[str, Any], key: str) -> Any:
    """The JSON value of ``config[key]``; a :class:`ProtocolError` naming ``key`` otherwise."""
    raw = config[key]
    if not isinstance(raw, str | bytes):
        raise ProtocolError(f"config field {key!r} must be a JSON string, got {type(raw).__name__}")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ProtocolError(f"config field {key!r} is nested too deeply") from None
    except ValueError as e:
        raise ProtocolError(f"config field {key!r} is not valid JSON: {e}") from None


def _collect(problems: list[str], check: Callable[[], object], prefix: str = "") -> bool:
    """Run one name check; on :class:`UnsafeNameError` append its message to ``problems``."""
    try:
        check()
    except UnsafeNameError as e:
        problems.append(f"{prefix}{e}")
        return False
    return True


def _round_number(value: Any, first: int) -> int | None:
    """``value`` as an integer >= ``first`` (an int, or a string of decimal digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    if isinstance(value, int) and first <= value < 10**18:
        return value
    return None


ERROR_REFUSED = 4001
"""Error code: the site's policy or budget refuses the request (reason in the error)."""
ERROR_CACHE_MISS = 4002
"""Error code: components referenced by digest are not cached; reason is a JSON list."""
ERROR_INVALID = 4003
"""Error code: the request is malformed (missing config field, unknown stage...)."""
ERROR_SITE = 4004
"""Error code: the site failed to serve the request (data, training); reason explains."""
