"""Checks of the values a site sends back: numbers, JSON config, ε, counts, finiteness.

Every reply is untrusted (a site may be faulty or malicious) and is checked on its own: a
malformed query reply (bad capabilities JSON, no or an invalid site name, a bad ε) makes
that node ineligible; two nodes reporting one site name are both refused; a malformed train
reply (bad ``cached``/``epsilon`` config, non-numeric metrics, a ``num-examples`` that is
missing, not finite, not positive or above the site's reported train count, wrong keys or
shapes, an update norm above the stage's ``max_update_norm``) removes only that site from
the round, with the reason in the round record's ``rejected``. A merged model that is not
finite is never loaded, checkpointed or committed: the round fails with a
:class:`StageError` and the registry keeps its previous state.

These helpers turn a reply's raw values into checked ones or into the problem that refuses
them, for the coordinator's link to the sites (:mod:`server.site_link`) and the round
strategies (:mod:`server.rounds`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from server.eligibility import train_bound
from server.errors import StageError
from unicon_model import protocol

if TYPE_CHECKING:
    from server.sites import SiteLedger
    from server.transport import Incoming
    from unicon_model.schema import Plan

logger = logging.getLogger(__name__)

MAX_CAPABILITIES_CHARS = 1_000_000
"""Longest capabilities JSON a node may send (a site's capabilities take a few kB)."""


def as_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    return float(value)


def json_value(value: object, what: str) -> tuple[Any, str]:
    """Decode a JSON config value; ``(value, "")`` or ``(None, problem)``."""
    if not isinstance(value, str | bytes | int | float) or isinstance(value, bool):
        return None, f"{what} must be JSON text, got {type(value).__name__}"
    text = value if isinstance(value, str | bytes) else str(value)
    if len(text) > MAX_CAPABILITIES_CHARS:
        return None, f"{what} is {len(text)} characters long (limit {MAX_CAPABILITIES_CHARS})"
    try:
        return json.loads(text), ""
    except (ValueError, RecursionError) as e:
        return None, f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:80]})"


def parse_epsilon(value: object) -> tuple[float | None, str]:
    """A site's reported ε: a finite number >= 0, as a number or JSON text."""
    number = as_number(value)
    if number is None and isinstance(value, str | bytes):
        decoded, problem = json_value(value, "epsilon")
        if problem:
            return None, problem
        number = as_number(decoded)
    if number is None or not math.isfinite(number) or number < 0:
        return None, f"epsilon must be a finite number >= 0, got {value!r:.80}"
    return number, ""


def check_num_examples(metrics: Mapping[str, Any], bound: int, what: str = "train") -> str:
    """Problem of a reply's ``num-examples`` (empty if fine): finite, > 0, <= ``bound``."""
    if protocol.KEY_NUM_EXAMPLES not in metrics:
        return f"the reply has no {protocol.KEY_NUM_EXAMPLES}"
    raw = metrics[protocol.KEY_NUM_EXAMPLES]
    value = as_number(raw)
    if value is None or not math.isfinite(value):
        return f"{protocol.KEY_NUM_EXAMPLES} {raw!r:.40} is not a finite number"
    if value <= 0:
        return f"{protocol.KEY_NUM_EXAMPLES} {value:g} is not positive"
    if value > bound:
        return (
            f"{protocol.KEY_NUM_EXAMPLES} {value:g} exceeds the {bound} {what} case(s) the site "
            "reported in its capabilities"
        )
    return ""


def non_finite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def require_finite(state: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`StageError` naming the keys of ``state`` that hold NaN or Inf."""
    bad = non_finite_keys(state)
    if bad:
        raise StageError(
            f"{what} has NaN/Inf in {len(bad)} tensor(s), e.g. {bad[:3]}; the round is "
            "discarded and nothing is loaded, checkpointed or committed"
        )


def reply_problems(reply: Incoming) -> tuple[list[str], Any, float | None]:
    """Why a (non-error) reply is malformed, with its decoded ``cached`` and ``epsilon``.

    Returns
    -------
    tuple
        The problems (empty if none): a ``cached`` value that is not a JSON list of digests,
        an ``epsilon`` that is not a finite number >= 0, or a metric that is not a number;
        then the decoded ``cached`` value and ε (meaningful only without problems).
    """
    problems = []
    cached, problem = json_value(reply.config.get(protocol.KEY_CACHED, "[]"), "cached")
    if problem:
        problems.append(problem)
    elif not isinstance(cached, list) or not all(isinstance(c, str) for c in cached):
        problems.append(f"cached must be a list of digests, got {cached!r:.80}")
    epsilon, problem = parse_epsilon(reply.config.get(protocol.KEY_EPSILON, 0.0))
    if problem:
        problems.append(problem)
    bad_metrics = sorted(k for k, v in reply.metrics.items() if as_number(v) is None)
    if bad_metrics:
        problems.append(f"metrics {bad_metrics[:5]} are not numbers")
    return problems, cached, epsilon


def checked_replies(
    plan: Plan,
    index: int,
    sites: Mapping[int, SiteLedger],
    replies: list[Incoming],
    malformed: Mapping[int, str],
) -> dict[str, str]:
    """Site -> why its train reply is refused before validation (config, num-examples)."""
    rejected: dict[str, str] = {}
    for reply in replies:
        if not reply.ok:
            continue
        site = sites[reply.node_id]
        bound = train_bound(plan, index, site.capabilities)
        problem = malformed.get(reply.node_id) or check_num_examples(reply.metrics, bound)
        if problem:
            rejected[site.site] = problem
            logger.warning("rejected the reply of %s: %s", site.site, problem)
    return rejected
