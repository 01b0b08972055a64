"""What the coordinator knows of each site, and the check of the sites' query replies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.eligibility import capability_problems, duplicate_reasons
from server.round_checks import json_value
from server.transport import Incoming
from unicon_model import protocol
from unicon_model.names import is_valid_name

logger = logging.getLogger(__name__)


@dataclass
class SiteLedger:
    """What the coordinator knows of one site during a run."""

    node_id: int
    site: str
    capabilities: dict[str, Any] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)
    bytes_up: int = 0
    bytes_down: int = 0
    epsilon: float = 0.0


@dataclass
class QueryOutcome:
    """The query replies sorted into usable capabilities and refusals.

    Attributes
    ----------
    valid
        Node id -> its capabilities, for the nodes whose reply is usable.
    problems
        Node id -> every reason its reply is refused.
    claimed
        Node id -> the (valid) site name its reply claimed, usable or not (for messages).
    """

    valid: dict[int, dict[str, Any]] = field(default_factory=dict)
    problems: dict[int, list[str]] = field(default_factory=dict)
    claimed: dict[int, str] = field(default_factory=dict)


def sort_query_replies(replies: list[Incoming], sites: Mapping[int, SiteLedger]) -> QueryOutcome:
    """Check every query reply against the capability rules and the sites known so far.

    A reply is refused if its capabilities are malformed, if its node reported another
    site name earlier in the run (``sites``), or if another node reports the same site name
    (both are refused). An error reply is logged and neither usable nor refused.
    """
    outcome = QueryOutcome()
    for reply in replies:
        if not reply.ok:
            logger.warning(
                "node %d did not answer the query: %s", reply.node_id, reply.error_reason
            )
            continue
        caps, problem = json_value(
            reply.config.get(protocol.KEY_CAPABILITIES, "{}"), "capabilities"
        )
        found = [problem] if problem else capability_problems(caps)
        known = sites.get(reply.node_id)
        if not found and known is not None and known.site != caps["site"]:
            found.append(
                f"node {reply.node_id} reported site {known.site!r} earlier in this run "
                f"and now {caps['site']!r}"
            )
        if isinstance(caps, dict) and is_valid_name(caps.get("site")):
            outcome.claimed[reply.node_id] = str(caps["site"])
        if found:
            outcome.problems[reply.node_id] = found
        else:
            outcome.valid[reply.node_id] = caps
    names = {n: c["site"] for n, c in outcome.valid.items()}
    for node, reason in duplicate_reasons(names).items():
        outcome.problems[node] = [reason]
        del outcome.valid[node]
    return outcome
