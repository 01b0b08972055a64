"""The coordinator's link to the sites: who they are, and the stage messages sent to them.

:class:`SiteLink` queries the connected nodes for their capabilities (refusing malformed or
duplicate ones), selects a stage's eligible sites, and sends stage requests, leaving out the
model components a site already holds (by digest) and checking every reply's config. It is
what a round strategy uses of the coordinator (:class:`server.rounds.base.RoundHost`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from server.eligibility import Eligibility, check_site
from server.errors import StageError
from server.round_checks import reply_problems
from server.sites import SiteLedger, sort_query_replies
from server.timing import PhaseClock
from server.transport import Incoming, Outgoing, Transport, tensor_bytes
from unicon_model import protocol
from unicon_model.checkpoint import tensor_digest
from unicon_model.components import split_by_component
from unicon_model.model import UniconModel
from unicon_model.schema import Plan

logger = logging.getLogger(__name__)


class SiteLink:
    """The sites of a run: their ledgers, their query and the stage requests sent to them.

    Parameters
    ----------
    plan
        The validated plan.
    transport
        Message exchange with the sites.
    clock
        Where the waits and request building are timed (shared with the coordinator).
    run_key
        The run's identity, sent with every request.
    query_timeout
        Seconds to wait for capability replies.
    site_wait
        Seconds to wait for enough eligible sites before failing the stage.
    """

    def __init__(
        self,
        plan: Plan,
        transport: Transport,
        clock: PhaseClock,
        *,
        run_key: str,
        query_timeout: float = 60.0,
        site_wait: float = 60.0,
    ) -> None:
        self.plan = plan
        self.transport = transport
        self.clock = clock
        self.run_key = run_key
        self.query_timeout = query_timeout
        self.site_wait = site_wait
        self.sites: dict[int, SiteLedger] = {}
        """Node id -> what the coordinator knows of its site."""
        self.refused: dict[int, Eligibility] = {}
        """Nodes refused at the last query (malformed capabilities, duplicate site name)."""
        self.counted: dict[str, list[str]] = {}
        """Site -> the stages whose statistics of the heads the current analytic update
        stage updates it gave (set by the coordinator before selecting; those sites are not
        eligible for the update)."""

    # ------------------------------------------------------------------ sites
    def query(self) -> dict[int, dict[str, Any]]:
        """Capabilities of the nodes that answered with usable ones.

        A node whose capabilities are malformed, that changed its site name during the run,
        or that reports a site name another node also reports gets none: it is recorded in
        :attr:`refused` with every reason, logged, and neither selected nor asked to evaluate.
        """
        nodes = self.transport.node_ids()
        replies = self.transport.exchange(
            [Outgoing(n, "query") for n in nodes], timeout=self.query_timeout
        )
        answered = {r.node_id for r in replies if r.ok}
        for node, ledger in self.sites.items():
            if node not in answered:
                ledger.capabilities = {}  # gone or silent: not asked again until it answers
        outcome = sort_query_replies(replies, self.sites)
        self.refused = {}
        for node, found in outcome.problems.items():
            known = self.sites.get(node)
            label = known.site if known is not None else outcome.claimed.get(node, f"node-{node}")
            if known is not None:
                known.capabilities = {}
            self.refused[node] = Eligibility(node, label, False, tuple(found))
            logger.warning("node %d (%s) is ineligible: %s", node, label, "; ".join(found))
        for node, caps in outcome.valid.items():
            ledger = self.sites.setdefault(node, SiteLedger(node, caps["site"]))
            ledger.capabilities = caps
            ledger.epsilon = float(caps.get("epsilon", 0.0))
        return outcome.valid

    def select_sites(self, index: int) -> list[Eligibility]:
        """Eligible sites of a stage, waiting (bounded) for the stage's minimum."""
        stage = self.plan.stages[index]
        deadline = time.monotonic() + self.site_wait
        while True:
            checks = [
                check_site(self.plan, index, n, caps, counted=self.counted)
                for n, caps in self.query().items()
            ]
            checks += self.refused.values()
            eligible = [c for c in checks if c.eligible]
            if len(eligible) >= stage.min_sites:
                return eligible
            if time.monotonic() >= deadline:
                details = (
                    "; ".join(f"{c.site}: {', '.join(c.reasons)}" for c in checks if not c.eligible)
                    or "no site connected"
                )
                raise StageError(
                    f"stage {stage.name!r} needs {stage.min_sites} eligible site(s), found "
                    f"{len(eligible)} after waiting {self.site_wait:.0f} s ({details})"
                )
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))

    # ------------------------------------------------------------------ messaging
    def request(
        self, index: int, round_: int, model: UniconModel, split: str = "train"
    ) -> tuple[protocol.StageRequest, dict[str, dict[str, Tensor]]]:
        """The stage request of ``round_`` and the model's components (digests in it)."""
        with self.clock.phase("request"):
            components = split_by_component(model.state_dict())
            digests = {c: tensor_digest(t) for c, t in components.items()}
        request = protocol.StageRequest(
            plan=self.plan,
            stage=self.plan.stages[index].name,
            server_round=round_,
            run=self.run_key,
            digests=digests,
            split=split,
        )
        return request, components

    def send(
        self,
        message_type: str,
        nodes: list[int],
        request: protocol.StageRequest,
        components: Mapping[str, Mapping[str, Tensor]],
        timeout: float,
    ) -> tuple[list[Incoming], dict[int, str]]:
        """Send a request; components a node holds (by digest) are not sent again.

        Returns
        -------
        tuple
            Every reply, and node id -> why its (non-error) reply is malformed: a ``cached``
            value that is not a JSON list of digests, an ``epsilon`` that is not a finite
            number >= 0, or a metric that is not a number. A malformed reply changes nothing
            the coordinator knows of the site.
        """

        def outgoing(node: int, resend_all: bool = False) -> Outgoing:
            known = set() if resend_all else self.sites[node].cached
            arrays = {
                k: v
                for c, t in components.items()
                if request.digests[c] not in known
                for k, v in t.items()
            }
            self.sites[node].bytes_down += tensor_bytes(arrays)
            return Outgoing(node, message_type, request.to_config(), arrays)

        with self.clock.phase(f"{message_type}_wait"):
            replies = self.transport.exchange([outgoing(n) for n in nodes], timeout=timeout)
        misses = [r.node_id for r in replies if r.error_code == protocol.ERROR_CACHE_MISS]
        if misses:
            logger.info("resending full components to %s (cache miss)", misses)
            with self.clock.phase(f"{message_type}_wait"):
                retry = {
                    r.node_id: r
                    for r in self.transport.exchange(
                        [outgoing(n, resend_all=True) for n in misses], timeout=timeout
                    )
                }
            replies = [retry.get(r.node_id, r) for r in replies]
        return replies, self._take_replies(message_type, replies)

    def _take_replies(self, message_type: str, replies: list[Incoming]) -> dict[int, str]:
        """Count the replies' bytes and learn each well-formed one's cache, ε and timing.

        Returns node id -> why its (non-error) reply is malformed (see :meth:`send`).
        """
        malformed: dict[int, str] = {}
        for reply in replies:
            site = self.sites[reply.node_id]
            site.bytes_up += tensor_bytes(reply.arrays)
            if not reply.ok:
                logger.warning(
                    "%s: %s error %s: %s",
                    site.site,
                    message_type,
                    reply.error_code,
                    reply.error_reason,
                )
                continue
            problems, cached, epsilon = reply_problems(reply)
            if problems:
                malformed[reply.node_id] = "malformed reply: " + "; ".join(problems)
                logger.warning("%s: %s", site.site, malformed[reply.node_id])
            else:
                site.cached = set(cached)
                site.epsilon = float(epsilon or 0.0)
                self.clock.add_site(site.site, reply.metrics)
        return malformed
