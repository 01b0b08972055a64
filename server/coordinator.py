"""The stage driver: runs a plan's pending stages over a :class:`Transport`.

For each stage: query the sites and select the eligible ones (bounded wait for the stage's
minimum), grow the global model by the stage spec, run the stage's rounds (send each site
the components it does not hold yet, collect the trained subset, validate, FedAvg weighted
by examples; analytic stages sum statistics and solve once), validate on the training sites'
``val`` splits every ``validate_every`` rounds (and after the last), checkpoint every round,
then evaluate every learned task on every site and commit a model version with its lineage:
the best-validated round's model with ``keep_best`` (the default), else the last round's; a
stage with ``patience`` stops once that many validations in a row did not improve the score.
A relaunch resumes from the registry: completed stages are skipped and the stage in
progress continues after its last checkpointed round, with its best round so far.

Every "pooled" metric here (``R``, the validation score) is the case-weighted mean of the
sites' own metrics, each computed by the site over its own cases, not one metric over the
union of the cases: that would need every case's prediction and label at the coordinator,
which the sites do not release (a per-case prediction or label is patient data).

Every reply is untrusted (a site may be faulty or malicious) and is checked on its own: a
malformed query reply (bad capabilities JSON, no or an invalid site name, a bad ε) makes
that node ineligible; two nodes reporting one site name are both refused; a malformed train
reply (bad ``cached``/``epsilon`` config, non-numeric metrics, a ``num-examples`` that is
missing, not finite, not positive or above the site's reported train count, wrong keys or
shapes, an update norm above the stage's ``max_update_norm``) removes only that site from
the round, with the reason in the round record's ``rejected``. A merged model that is not
finite is never loaded, checkpointed or committed: the round fails with a
:class:`StageError` and the registry keeps its previous state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from server.eligibility import (
    Eligibility,
    capability_problems,
    check_site,
    duplicate_reasons,
    split_bound,
    train_bound,
)
from server.errors import RegistryError, StageError
from server.registry import Registry, RunProgress
from server.timing import PhaseClock
from server.transport import Incoming, Outgoing, Transport, tensor_bytes
from server.validation import (
    structural_problems,
    validate_updates,
    weighted_average,
)
from unicon_model import protocol
from unicon_model.analytic import AnalyticHead, RidgeStatistics, merge_statistics
from unicon_model.checkpoint import Lineage, PretrainedRecord, tensor_digest
from unicon_model.components import load_state, select_state, split_by_component
from unicon_model.errors import UniconModelError
from unicon_model.layers import pooled_size
from unicon_model.metrics.evaluation import combine_sites
from unicon_model.metrics.uncertainty import CI_METHOD
from unicon_model.model import UniconModel
from unicon_model.names import is_valid_name
from unicon_model.pretrained import read_pretrained, seed_from_pretrained
from unicon_model.schema import PRIMARY_METRIC, Plan

if TYPE_CHECKING:
    from server.secure_aggregation import SecureResult

logger = logging.getLogger(__name__)


AGGREGATION = (
    "case-weighted mean of site metrics: each site computes the metric over its own cases and "
    "the coordinator averages the sites' values weighted by their case counts (not one metric "
    "over the pooled cases, which would need per-case predictions and labels the sites do not "
    "release)"
)
"""What every "pooled" value (R, the validation score) is, as written in results and records."""

ProgressCallback = Callable[[dict[str, Any]], None]

MAX_CAPABILITIES_CHARS = 1_000_000
"""Longest capabilities JSON a node may send (a site's capabilities take a few kB)."""


def _number(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    return float(value)


def _json_value(value: object, what: str) -> tuple[Any, str]:
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
    number = _number(value)
    if number is None and isinstance(value, str | bytes):
        decoded, problem = _json_value(value, "epsilon")
        if problem:
            return None, problem
        number = _number(decoded)
    if number is None or not math.isfinite(number) or number < 0:
        return None, f"epsilon must be a finite number >= 0, got {value!r:.80}"
    return number, ""


def check_num_examples(metrics: Mapping[str, Any], bound: int, what: str = "train") -> str:
    """Problem of a reply's ``num-examples`` (empty if fine): finite, > 0, <= ``bound``."""
    if protocol.KEY_NUM_EXAMPLES not in metrics:
        return f"the reply has no {protocol.KEY_NUM_EXAMPLES}"
    raw = metrics[protocol.KEY_NUM_EXAMPLES]
    value = _number(raw)
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
        since = _number(metrics.get("val/since_best"))
        best = cls(since=int(since) if since is not None and 0 <= since < 1e9 else 0)
        round_, score = (
            _number(metrics.get("val/best_round")),
            _number(metrics.get("val/best_score")),
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


def evaluation_lineage_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """What a version's lineage records of its test evaluation beyond the pooled values.

    ``worst/<route>`` and ``gap/<route>`` (the worst site's metric and best - worst, from
    ``fairness``) and, when the plan holds sites out, ``unseen/<route>`` (the held-out sites'
    case-weighted metric): what ``unicon model gate`` checks. Non-finite values are left out.
    """
    out: dict[str, float] = {}
    for route, entry in (evaluation.get("fairness") or {}).items():
        for name in ("worst", "gap"):
            value = _number(entry.get(name)) if isinstance(entry, Mapping) else None
            if value is not None and math.isfinite(value):
                out[f"{name}/{route}"] = value
    for route, raw in ((evaluation.get("unseen") or {}).get("pooled") or {}).items():
        value = _number(raw)
        if value is not None and math.isfinite(value):
            out[f"unseen/{route}"] = value
    return out


def plan_digest(plan: Plan) -> str:
    """Identity of a plan's content (a relaunch must use the same plan to resume)."""
    return hashlib.sha256(plan.model_dump_json().encode()).hexdigest()


class Coordinator:
    """Runs a plan's stages over a transport, recording everything in a registry.

    Parameters
    ----------
    plan
        The validated plan.
    registry
        Where versions, round checkpoints and metrics go.
    transport
        Message exchange with the sites.
    query_timeout
        Seconds to wait for capability replies.
    site_wait
        Seconds to wait for enough eligible sites before failing the stage.
    evaluate_timeout
        Seconds to wait for evaluation replies after a stage.
    on_progress
        Called with a small dict after each round and stage (CLI progress display).
    """

    def __init__(
        self,
        plan: Plan,
        registry: Registry,
        transport: Transport,
        *,
        query_timeout: float = 60.0,
        site_wait: float = 60.0,
        evaluate_timeout: float = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.plan = plan
        self.registry = registry
        self.transport = transport
        self.query_timeout = query_timeout
        self.site_wait = site_wait
        self.evaluate_timeout = evaluate_timeout
        self.on_progress = on_progress or (lambda _: None)
        self.sites: dict[int, SiteLedger] = {}
        self.refused: dict[int, Eligibility] = {}
        """Nodes refused at the last query (malformed capabilities, duplicate site name)."""
        self.run_key = f"{plan.name}-{plan_digest(plan)[:12]}"
        self.clock = PhaseClock()
        """Where the time of the round (or stage phase) in progress goes (:mod:`server.timing`)."""

    # ------------------------------------------------------------------ plan level
    def run(self, *, only_stage: str | None = None) -> RunProgress:
        """Run every pending stage (or only ``only_stage``); return the final progress."""
        progress = self.registry.progress(self.plan.name)
        digest = plan_digest(self.plan)
        if progress.plan_digest and progress.plan_digest != digest and progress.completed:
            raise RegistryError(
                f"plan {self.plan.name!r} changed since its last run (completed stages "
                f"{progress.completed_stages}); use a new plan name or a new registry"
            )
        progress.plan_digest = digest
        self.registry.save_progress(progress)
        for index, stage in enumerate(self.plan.stages):
            if stage.name in progress.completed_stages:
                continue
            if only_stage is not None and stage.name != only_stage:
                continue
            missing = [
                s.name for s in self.plan.stages[:index] if s.name not in progress.completed_stages
            ]
            if missing:
                raise StageError(f"stage {stage.name!r} needs the earlier stages {missing} first")
            self.run_stage(index)
            progress = self.registry.progress(self.plan.name)
        return progress

    def _starting_model(self, index: int) -> tuple[UniconModel, int]:
        """The global model to continue from, and the first round to run.

        On a resume, :attr:`resumed_lineage` is the round checkpoint's lineage (else ``None``).
        """
        stage = self.plan.stages[index]
        progress = self.registry.progress(self.plan.name)
        self.resumed_lineage: Lineage | None = None
        # the first stage starts from [model.pretrained] if set; its version's lineage records it
        pretrained = None if progress.completed else self.plan.model.pretrained
        self.pretrained: PretrainedRecord | None = None
        if progress.current is not None and progress.current.stage == stage.name:
            resumed = self.registry.load_round(self.plan.name)
            if resumed is not None:
                logger.info("resuming stage %s after round %d", stage.name, progress.current.round)
                self.resumed_lineage = resumed[1].lineage
                if pretrained is not None:  # seeded before the crash: record the same file
                    path, kind, sha256, _ = read_pretrained(pretrained)
                    self.pretrained = PretrainedRecord(path=str(path), sha256=sha256, format=kind)
                return resumed[0], progress.current.round + 1
        if progress.completed:
            model, _ = self.registry.load(progress.completed[-1].version)
        else:
            model = UniconModel(self.plan.model)
        model.grow(stage)
        if pretrained is not None:  # a bad file fails here, before any round or commit
            self.pretrained = seed_from_pretrained(model, pretrained).record()
        return model, 1

    # ------------------------------------------------------------------ sites
    def _query(self) -> dict[int, dict[str, Any]]:
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
        valid: dict[int, dict[str, Any]] = {}
        problems: dict[int, list[str]] = {}
        claimed: dict[int, str] = {}
        for reply in replies:
            if not reply.ok:
                logger.warning(
                    "node %d did not answer the query: %s", reply.node_id, reply.error_reason
                )
                continue
            caps, problem = _json_value(
                reply.config.get(protocol.KEY_CAPABILITIES, "{}"), "capabilities"
            )
            found = [problem] if problem else capability_problems(caps)
            known = self.sites.get(reply.node_id)
            if not found and known is not None and known.site != caps["site"]:
                found.append(
                    f"node {reply.node_id} reported site {known.site!r} earlier in this run "
                    f"and now {caps['site']!r}"
                )
            if isinstance(caps, dict) and is_valid_name(caps.get("site")):
                claimed[reply.node_id] = str(caps["site"])
            if found:
                problems[reply.node_id] = found
            else:
                valid[reply.node_id] = caps
        for node, reason in duplicate_reasons({n: c["site"] for n, c in valid.items()}).items():
            problems[node] = [reason]
            del valid[node]
        self.refused = {}
        for node, found in problems.items():
            known = self.sites.get(node)
            label = known.site if known is not None else claimed.get(node, f"node-{node}")
            if known is not None:
                known.capabilities = {}
            self.refused[node] = Eligibility(node, label, False, tuple(found))
            logger.warning("node %d (%s) is ineligible: %s", node, label, "; ".join(found))
        for node, caps in valid.items():
            ledger = self.sites.setdefault(node, SiteLedger(node, caps["site"]))
            ledger.capabilities = caps
            ledger.epsilon = float(caps.get("epsilon", 0.0))
        return valid

    def select_sites(self, index: int) -> list[Eligibility]:
        """Eligible sites of a stage, waiting (bounded) for the stage's minimum."""
        stage = self.plan.stages[index]
        deadline = time.monotonic() + self.site_wait
        while True:
            checks = [check_site(self.plan, index, n, caps) for n, caps in self._query().items()]
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
    def _request(
        self, index: int, round_: int, model: UniconModel, split: str = "train"
    ) -> tuple[protocol.StageRequest, dict[str, dict[str, Tensor]]]:
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

    def _send(
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
            problems = []
            cached, problem = _json_value(reply.config.get(protocol.KEY_CACHED, "[]"), "cached")
            if problem:
                problems.append(problem)
            elif not isinstance(cached, list) or not all(isinstance(c, str) for c in cached):
                problems.append(f"cached must be a list of digests, got {cached!r:.80}")
            epsilon, problem = parse_epsilon(reply.config.get(protocol.KEY_EPSILON, 0.0))
            if problem:
                problems.append(problem)
            bad_metrics = sorted(k for k, v in reply.metrics.items() if _number(v) is None)
            if bad_metrics:
                problems.append(f"metrics {bad_metrics[:5]} are not numbers")
            if problems:
                malformed[reply.node_id] = "malformed reply: " + "; ".join(problems)
                logger.warning("%s: %s", site.site, malformed[reply.node_id])
            else:
                site.cached = set(cached)
                site.epsilon = float(epsilon or 0.0)
                self.clock.add_site(site.site, reply.metrics)
        return replies, malformed

    # ------------------------------------------------------------------ stage
    def run_stage(self, index: int) -> str:
        """Run one stage to the end; return the committed version."""
        stage = self.plan.stages[index]
        self.clock.reset()
        stage_started = time.perf_counter()
        with self.clock.phase("selection"):
            eligible = self.select_sites(index)
            nodes = [e.node_id for e in eligible]
            model, first_round = self._starting_model(index)
        selection = self.clock.summary(time.perf_counter() - stage_started)
        logger.info(
            "stage %s: %d site(s) %s, rounds %d..%d",
            stage.name,
            len(nodes),
            [e.site for e in eligible],
            first_round,
            stage.rounds,
        )
        rounds = 1 if stage.is_analytic else stage.rounds
        best = self._resumed_best(index, first_round)
        last_round = first_round - 1
        for round_ in range(first_round, rounds + 1):
            if self._patience_spent(index, best):
                break
            started = time.perf_counter()
            self.clock.reset()
            with self.clock.phase("aggregation"):
                if stage.is_analytic:
                    record = self._analytic_round(index, model, nodes)
                else:
                    record = self._train_round(index, round_, model, nodes)
                self._require_finite(
                    model.state_dict(), f"stage {stage.name!r} round {round_}: the global model"
                )
            with self.clock.phase("validation"):
                if self._validates(index, round_, rounds):
                    validation = self.validate(index, round_, model, nodes)
                    record.update(val=validation, val_score=validation["score"])
                    if (
                        best.update(round_, validation["score"], stage.min_delta)
                        and stage.keep_best
                    ):
                        best.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        self.registry.save_best(
                            self.plan.name,
                            stage.name,
                            round_,
                            model,
                            Lineage(
                                plan=self.plan.name,
                                stage=stage.name,
                                stage_index=index,
                                rounds=round_,
                                metrics={"val/score": float(validation["score"])},
                            ),
                        )
                    record.update(best_round=best.round, keep_best=stage.keep_best)
                    if self._patience_spent(index, best):
                        record["stopped_early"] = True
                        logger.info(
                            "stage %s: stopping after round %d of %d, %d validation(s) without an "
                            "improvement over round %s (patience %s)",
                            stage.name,
                            round_,
                            rounds,
                            best.since,
                            best.round,
                            stage.patience,
                        )
            with self.clock.phase("checkpoint"):
                lineage = Lineage(
                    plan=self.plan.name,
                    stage=stage.name,
                    stage_index=index,
                    rounds=round_,
                    metrics=best.to_metrics(),
                )
                self.registry.save_round(self.plan.name, stage.name, round_, model, lineage)
                self.registry.prune_best(
                    self.plan.name, keep=best.round if stage.keep_best else None
                )
            wall = time.perf_counter() - started  # the round, its checkpoint included
            record.update(
                stage=stage.name,
                round=round_,
                rounds=rounds,
                wall_s=wall,
                timing=self.clock.summary(wall),
            )
            self.registry.append_metrics(self.plan.name, {"kind": "round", **record})
            self.on_progress({"kind": "round", **record})
            last_round = round_
        kept = last_round
        if stage.keep_best and best.state is not None and best.round != last_round:
            model.load_state_dict(best.state)
            kept = int(best.round or last_round)
            logger.info(
                "stage %s: committing round %d (validation score %.4f), not the last round %d",
                stage.name,
                kept,
                best.score,
                last_round,
            )
        self.clock.reset()
        finishing = time.perf_counter()
        with self.clock.phase("evaluation"):
            evaluation = self.evaluate(index, model)
        sites = sorted(self.sites[n].site for n in nodes)
        pooled = evaluation["pooled"]
        completed = self.registry.progress(self.plan.name).completed
        lineage = Lineage(
            plan=self.plan.name,
            stage=stage.name,
            stage_index=index,
            parent=completed[-1].version if completed else None,
            sites=sites,
            rounds=last_round,
            epsilon={self.sites[n].site: self.sites[n].epsilon for n in self.sites},
            metrics={
                **{k: v for k, v in pooled.items() if math.isfinite(v)},
                **self._kept_metrics(kept, best),
                **evaluation_lineage_metrics(evaluation),
            },
            pretrained=self.pretrained,
        )
        self._require_finite(model.state_dict(), f"stage {stage.name!r}: the global model")
        with self.clock.phase("commit"):
            version = self.registry.commit(model, lineage=lineage, data=self.plan.data)
            self.registry.complete_stage(self.plan.name, stage.name, version)
            self._record_results(index, evaluation)
        self.registry.append_metrics(
            self.plan.name,
            {
                "kind": "stage_timing",
                "stage": stage.name,
                "selection": selection,
                "finish": self.clock.summary(time.perf_counter() - finishing),
                "wall_s": time.perf_counter() - stage_started,
            },
        )
        self.on_progress(
            {"kind": "stage", "stage": stage.name, "version": version, "metrics": pooled}
        )
        return version

    # ------------------------------------------------------------------ validation
    def _validates(self, index: int, round_: int, rounds: int) -> bool:
        """Whether round ``round_`` is validated: every ``validate_every``-th and the last."""
        stage = self.plan.stages[index]
        if stage.is_analytic or stage.validate_every == 0:
            return False
        return round_ % stage.validate_every == 0 or round_ == rounds

    def _patience_spent(self, index: int, best: BestRound) -> bool:
        """Whether the stage stops: ``patience`` validations in a row without improvement."""
        patience = self.plan.stages[index].patience
        return patience is not None and best.since >= patience

    def _resumed_best(self, index: int, first_round: int) -> BestRound:
        """The best round so far: restored from the round checkpoint on a resume.

        The round checkpoint's lineage holds the best round, its score and the validations
        since; the best model is ``best-<round>`` in the registry. Without that checkpoint
        (damaged or deleted) the best-tracking restarts from the resumed round, logged.
        """
        stage = self.plan.stages[index]
        if first_round == 1 or self.resumed_lineage is None:
            return BestRound()
        best = BestRound.from_metrics(self.resumed_lineage.metrics)
        if best.round is None or not stage.keep_best:
            return best
        try:
            kept = self.registry.load_best(self.plan.name, stage.name, best.round)
        except RegistryError as e:
            logger.warning("%s", e)
            kept = None
        if kept is None:
            logger.warning(
                "stage %s: the model of its best round %d is gone; keeping the best of the "
                "rounds from %d on",
                stage.name,
                best.round,
                first_round,
            )
            return BestRound()
        best.state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        return best

    def validate(
        self, index: int, round_: int, model: UniconModel, nodes: list[int]
    ) -> dict[str, Any]:
        """Metrics of the stage's objective tasks on the training sites' ``val`` splits.

        Returns
        -------
        dict
            ``per_site`` (site -> ``task@modality`` -> primary metric), ``case_weighted_mean``
            (``task@modality`` -> the case-weighted mean of the sites' values) and ``score``:
            the mean of ``case_weighted_mean`` over the stage's objective tasks on its
            modality routes, or ``None`` if no site reported any (a site withholds a route
            whose val split is below its ``min_evaluation_cases``).
        """
        stage = self.plan.stages[index]
        columns = {
            f"{task}@{modality}"
            for task in stage.objective_tasks
            for modality in self.plan.stage_modalities(index)
        }
        evaluation = self.evaluate(index, model, split="val", nodes=nodes, round_=round_)
        per_site = {
            site: {c: v for c, v in row.items() if c in columns}
            for site, row in evaluation["per_site"].items()
        }
        means = {c: v for c, v in evaluation["pooled"].items() if c in columns}
        score = float(np.mean(list(means.values()))) if means else None
        if score is None:
            logger.warning(
                "stage %s round %d: no site reported a validation metric of %s",
                stage.name,
                round_,
                sorted(columns),
            )
        return {"per_site": per_site, "case_weighted_mean": means, "score": score}

    @staticmethod
    def _kept_metrics(kept: int, best: BestRound) -> dict[str, float]:
        """Lineage metrics naming the committed round (and its validation score)."""
        metrics = {"val/kept_round": float(kept)}
        if best.round == kept and best.score is not None:
            metrics["val/score"] = best.score
        return metrics

    def _train_round(
        self, index: int, round_: int, model: UniconModel, nodes: list[int]
    ) -> dict[str, Any]:
        stage = self.plan.stages[index]
        if stage.secure_aggregation:
            return self._secure_round(index, round_, model, nodes)
        request, components = self._request(index, round_, model)
        replies, malformed = self._send("train", nodes, request, components, stage.round_timeout)
        reference = select_state(model, stage.trained_components)
        failed = {self.sites[r.node_id].site: r.error_reason for r in replies if not r.ok}
        with self.clock.phase("update_check"):
            rejected = self._checked_replies(index, replies, malformed)
            candidates = [r for r in replies if r.ok and self.sites[r.node_id].site not in rejected]
            verdicts = validate_updates(
                {self.sites[r.node_id].site: r.arrays for r in candidates},
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
        self._require_finite(merged, f"stage {stage.name!r} round {round_}: the merged update")
        load_state(model, merged, components=stage.trained_components)
        total = sum(weights)
        losses = [
            (float(r.metrics.get("loss", math.nan)), w)
            for r, w in zip(accepted, weights, strict=True)
        ]
        finite = [(v, w) for v, w in losses if math.isfinite(v)]
        loss = sum(v * w for v, w in finite) / sum(w for _, w in finite) if finite else math.nan
        return {
            "sites": [self.sites[r.node_id].site for r in accepted],
            "loss": loss,
            "site_loss": {
                self.sites[r.node_id].site: v for r, (v, _) in zip(accepted, losses, strict=True)
            },
            "num_examples": total,
            "rejected": rejected,
            "failed": failed,
        }

    def _checked_replies(
        self, index: int, replies: list[Incoming], malformed: Mapping[int, str]
    ) -> dict[str, str]:
        """Site -> why its train reply is refused before validation (config, num-examples)."""
        rejected: dict[str, str] = {}
        for reply in replies:
            if not reply.ok:
                continue
            site = self.sites[reply.node_id]
            bound = train_bound(self.plan, index, site.capabilities)
            problem = malformed.get(reply.node_id) or check_num_examples(reply.metrics, bound)
            if problem:
                rejected[site.site] = problem
                logger.warning("rejected the reply of %s: %s", site.site, problem)
        return rejected

    @staticmethod
    def _require_finite(state: Mapping[str, Tensor], what: str) -> None:
        """Raise :class:`StageError` naming the keys of ``state`` that hold NaN or Inf."""
        bad = non_finite_keys(state)
        if bad:
            raise StageError(
                f"{what} has NaN/Inf in {len(bad)} tensor(s), e.g. {bad[:3]}; the round is "
                "discarded and nothing is loaded, checkpointed or committed"
            )

    def _analytic_round(self, index: int, model: UniconModel, nodes: list[int]) -> dict[str, Any]:
        stage = self.plan.stages[index]
        if stage.secure_aggregation:
            return self._secure_round(index, 1, model, nodes)
        request, components = self._request(index, 1, model)
        replies, malformed = self._send("train", nodes, request, components, stage.round_timeout)
        failed = {self.sites[r.node_id].site: r.error_reason for r in replies if not r.ok}
        rejected = self._checked_replies(index, replies, malformed)
        dim = pooled_size(self.plan.model.widths)
        statistics: dict[str, list[RidgeStatistics]] = {t.name: [] for t in stage.add_tasks}
        accepted = []
        for reply in replies:
            site = self.sites[reply.node_id].site
            if not reply.ok or site in rejected:
                continue
            parsed, problem = self._parse_statistics(index, reply, dim)
            if problem:
                rejected[site] = problem
                logger.warning("rejected the statistics of %s: %s", site, problem)
                continue
            accepted.append(reply)
            for name, value in parsed.items():
                statistics[name].append(value)
        if not accepted:
            raise StageError(
                f"analytic stage {stage.name!r}: no site returned valid statistics "
                f"(rejected: {rejected}, failed: {failed})"
            )
        solutions = {}
        for task in stage.add_tasks:
            if not statistics[task.name]:
                raise StageError(
                    f"analytic stage {stage.name!r}: no valid statistics for task {task.name!r}"
                )
            try:
                weight, bias = merge_statistics(statistics[task.name]).solve(l2=task.l2)
            except UniconModelError as e:
                raise StageError(f"analytic stage {stage.name!r} task {task.name!r}: {e}") from e
            solutions[task.name] = (weight, bias)
            self._require_finite(
                {
                    f"{task.name}.weight": torch.from_numpy(np.asarray(weight, dtype=np.float64)),
                    f"{task.name}.bias": torch.from_numpy(np.asarray(bias, dtype=np.float64)),
                },
                f"analytic stage {stage.name!r}: the ridge solution",
            )
        for name, (weight, bias) in solutions.items():
            head = model.tasks[name]
            assert isinstance(head, AnalyticHead)
            head.set_solution(weight, bias)
        return {
            "sites": [self.sites[r.node_id].site for r in accepted],
            "num_examples": sum(float(r.metrics[protocol.KEY_NUM_EXAMPLES]) for r in accepted),
            "rejected": rejected,
            "failed": failed,
        }

    def _parse_statistics(
        self, index: int, reply: Incoming, dim: int
    ) -> tuple[dict[str, RidgeStatistics], str]:
        """A reply's ridge statistics per task, or the problem that refuses them.

        A site sends the statistics of the stage's tasks it has labels for (all five arrays
        of a task, or none); each task's ``count`` may not exceed the reply's num-examples.
        """
        stage = self.plan.stages[index]
        expected: dict[str, Tensor] = {}
        present = []
        for task in stage.add_tasks:
            prefix = f"{task.name}{protocol.STATISTICS_SEPARATOR}"
            if any(k.startswith(prefix) for k in reply.arrays):
                present.append(task.name)
                zeros = RidgeStatistics.zeros(dim, task.num_outputs).to_arrays()
                expected.update({prefix + k: torch.from_numpy(v) for k, v in zeros.items()})
        if not present:
            return {}, "the reply holds no statistics of the stage's tasks"
        problems = structural_problems(reply.arrays, expected)
        if problems:
            return {}, "; ".join(problems)
        limit = float(reply.metrics[protocol.KEY_NUM_EXAMPLES])
        parsed: dict[str, RidgeStatistics] = {}
        for name in present:
            prefix = f"{name}{protocol.STATISTICS_SEPARATOR}"
            arrays = {
                k[len(prefix) :]: v.double().numpy()
                for k, v in reply.arrays.items()
                if k.startswith(prefix)
            }
            try:
                parsed[name] = RidgeStatistics.from_arrays(arrays)
            except UniconModelError as e:
                return {}, f"task {name!r}: {e}"
            if parsed[name].count > limit:
                return {}, (
                    f"task {name!r}: count {parsed[name].count} exceeds the reply's "
                    f"{protocol.KEY_NUM_EXAMPLES} {limit:g}"
                )
        return parsed, ""

    def _secure_round(
        self, index: int, round_: int, model: UniconModel, nodes: list[int]
    ) -> dict[str, Any]:
        """One round through SecAgg+: only the weighted mean of the sites' vectors is seen.

        Training stages receive the mean *change* of the trained components; analytic
        stages the sum of the statistics (mean of ``statistics / n`` times the total ``n``).
        Per-site update validation is impossible by design; the mean is checked instead
        (finite, and for training stages within ``max_update_norm`` of the global model, which
        every honest site's change is). The weights are visible: a site reporting a
        num-examples that is not finite, not positive or above its train count skews the
        mean, so the round is repeated without it (and skipped if fewer than 2 sites remain).
        """
        stage = self.plan.stages[index]
        request, components = self._request(index, round_, model)
        arrays = {k: v for tensors in components.values() for k, v in tensors.items()}
        if stage.is_analytic:
            dim = pooled_size(self.plan.model.widths)
            reply_shapes = {
                f"{task.name}{protocol.STATISTICS_SEPARATOR}{name}": list(value.shape)
                for task in stage.add_tasks
                for name, value in RidgeStatistics.zeros(dim, task.num_outputs).to_arrays().items()
            }
        else:
            reference = select_state(model, stage.trained_components)
            reply_shapes = {k: list(v.shape) for k, v in reference.items()}
        reply_shapes = dict(sorted(reply_shapes.items()))
        active = list(nodes)
        rejected: dict[str, str] = {}
        while True:
            result = self._secure_attempt(index, round_, active, request, arrays, reply_shapes)
            bad = self._secure_problems(index, result)
            if not bad:
                break
            for node, problem in bad.items():
                rejected[self.sites[node].site] = f"{problem}; the round was repeated without it"
                logger.warning(
                    "stage %s round %d: %s: %s", stage.name, round_, self.sites[node].site, problem
                )
            active = [n for n in active if n not in bad]
            if len(active) < 2:
                # SecAgg+ needs two sites: nothing trustworthy to aggregate this round
                result = dataclasses.replace(result, mean=None, num_examples={}, metrics={})
                break
        failed = {self.sites[n].site: "dropped out of secure aggregation" for n in result.failed}
        clipped = {
            self.sites[n].site: int(m.get(protocol.KEY_SECAGG_CLIPPED, 0))
            for n, m in result.metrics.items()
        }
        if any(clipped.values()):
            logger.warning(
                "stage %s round %d: values clipped by SecAgg+ per site %s; raise "
                "secagg.clipping_range",
                stage.name,
                round_,
                clipped,
            )
        total = sum(result.num_examples.values())
        record: dict[str, Any] = {
            "sites": sorted(self.sites[n].site for n in result.num_examples),
            "num_examples": total,
            "failed": failed,
            "rejected": rejected,
            "secure": True,
            "clipped": clipped,
        }
        if result.mean is None:
            logger.warning(
                "stage %s round %d: secure aggregation halted (%d of %d sites dropped); "
                "the model is unchanged",
                stage.name,
                round_,
                len(result.failed),
                len(nodes),
            )
            record["skipped"] = True
            return record
        what = f"stage {stage.name!r} round {round_}: the securely aggregated update"
        self._require_finite(result.mean, what)
        if stage.is_analytic:
            for task in stage.add_tasks:
                prefix = f"{task.name}{protocol.STATISTICS_SEPARATOR}"
                summed = {
                    k[len(prefix) :]: (v * total).numpy()
                    for k, v in result.mean.items()
                    if k.startswith(prefix)
                }
                summed["count"] = np.rint(summed["count"])  # undo quantisation of the count
                try:
                    weight, bias = RidgeStatistics.from_arrays(summed).solve(l2=task.l2)
                except UniconModelError as e:
                    raise StageError(f"{what} for task {task.name!r}: {e}") from e
                self._require_finite(
                    {
                        "weight": torch.from_numpy(np.asarray(weight, dtype=np.float64)),
                        "bias": torch.from_numpy(np.asarray(bias, dtype=np.float64)),
                    },
                    f"{what}: the ridge solution of task {task.name!r}",
                )
                head = model.tasks[task.name]
                assert isinstance(head, AnalyticHead)
                head.set_solution(weight, bias)
        else:
            reference = select_state(model, stage.trained_components)
            norm = math.sqrt(sum(float(result.mean[k].double().square().sum()) for k in reference))
            if norm > stage.max_update_norm:
                raise StageError(
                    f"{what} has norm {norm:.4g}, above the stage's max_update_norm "
                    f"{stage.max_update_norm:g} that bounds every honest site's change; the "
                    "round is discarded and nothing is loaded, checkpointed or committed"
                )
            merged = {
                k: (reference[k].double() + result.mean[k]).to(reference[k].dtype)
                for k in reference
            }
            self._require_finite(merged, what)
            load_state(model, merged, components=stage.trained_components)
        losses = [
            (result.metrics[n].get("loss", math.nan), w) for n, w in result.num_examples.items()
        ]
        record["loss"] = sum(v * w for v, w in losses) / total if total else math.nan
        record["site_loss"] = {
            self.sites[n].site: v for n, (v, _) in zip(result.num_examples, losses, strict=True)
        }
        return record

    def _secure_attempt(
        self,
        index: int,
        round_: int,
        nodes: list[int],
        request: protocol.StageRequest,
        arrays: Mapping[str, Tensor],
        reply_shapes: Mapping[str, list[int]],
    ) -> SecureResult:
        """One SecAgg+ run over ``nodes``; records bytes and the sites' checked ε."""
        stage = self.plan.stages[index]
        # weights are divided by max_weight: the largest train-case count keeps them near 1
        counts = [split_bound(self.sites[n].capabilities, "train") for n in nodes]
        max_weight = float(max([*counts, 1]))
        for node in nodes:
            self.sites[node].bytes_down += tensor_bytes(dict(arrays))
        with self.clock.phase("train_wait"):
            result = self.transport.secure_weighted_mean(
                nodes,
                config=request.to_config(),
                arrays=arrays,
                reply_shapes=reply_shapes,
                spec=stage.secagg,
                max_weight=max_weight,
                server_round=round_,
            )
        for node, metrics in result.metrics.items():
            if node in self.sites:
                self.clock.add_site(self.sites[node].site, metrics)
        values = sum(math.prod(shape) for shape in reply_shapes.values())
        for node in result.num_examples:
            # masked vectors travel as 64-bit integers, one per value plus the weight
            self.sites[node].bytes_up += 8 * (values + 1)
        return result

    def _secure_problems(self, index: int, result: SecureResult) -> dict[int, str]:
        """Node -> why the weight (or ε) it reported in a secure round is refused."""
        problems: dict[int, str] = {}
        for node, weight in result.num_examples.items():
            site = self.sites[node]
            metrics = result.metrics.get(node, {})
            bound = train_bound(self.plan, index, site.capabilities)
            problem = check_num_examples({protocol.KEY_NUM_EXAMPLES: weight}, bound)
            epsilon, bad_epsilon = parse_epsilon(metrics.get("epsilon", site.epsilon))
            if problem or bad_epsilon:
                problems[node] = "; ".join(p for p in (problem, bad_epsilon) if p)
            elif epsilon is not None:
                site.epsilon = epsilon
        return problems

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        index: int,
        model: UniconModel,
        split: str = "test",
        *,
        nodes: list[int] | None = None,
        round_: int = 0,
    ) -> dict[str, Any]:
        """Every learned task on every site that has it: per-site and pooled primary metrics.

        "Pooled" values are case-weighted means of the sites' metrics (:data:`AGGREGATION`):
        a metric over the union of the cases would need each case's prediction and label,
        which a site does not release. ``nodes`` (default: every node that answers a fresh
        query) are the sites asked; ``round_`` is the request's round (0 after a stage).
        Sites in the plan's ``[evaluation] holdout_sites`` are left out of every value above
        and reported under ``unseen`` instead (``sites``, ``per_site``, ``pooled``,
        ``pooled_ci``, ``per_site_ci``, ``per_site_n``), only when the plan holds sites out.
        """
        if nodes is None:
            self._query()
            nodes = [n for n, s in self.sites.items() if s.capabilities]
        else:
            nodes = [n for n in nodes if n in self.sites and self.sites[n].capabilities]
        request, components = self._request(index, round_, model, split=split)
        replies, malformed = self._send(
            "evaluate", nodes, request, components, self.evaluate_timeout
        )
        tasks = {
            name: spec
            for name, spec in self.plan.tasks_until(index).items()
            # a self-supervised task's score drives its stage's validation only, never R
            if split == "val" or not spec.self_supervised
        }
        per_site: dict[str, dict[str, float]] = {}
        sums: dict[str, list[tuple[float, float]]] = {}
        accepted: dict[str, dict[str, dict[str, float]]] = {}  # site -> route -> its metrics
        primaries: dict[str, str] = {}
        # held-out sites (never trained on) are scored apart and never enter the pooled values
        holdout = set(self.plan.evaluation.holdout_sites)
        unseen_rows: dict[str, dict[str, float]] = {}
        unseen_accepted: dict[str, dict[str, dict[str, float]]] = {}
        for reply in replies:
            if not reply.ok or reply.node_id in malformed:
                continue
            site = self.sites[reply.node_id].site
            held_out = site in holdout
            cases = split_bound(self.sites[reply.node_id].capabilities, split)
            row: dict[str, float] = {}
            for key, value in reply.metrics.items():
                parsed = protocol.parse_metric_key(key)
                if parsed is None or parsed[0] not in tasks:
                    continue
                task, modality, metric = parsed
                if metric != PRIMARY_METRIC[tasks[task].kind]:
                    continue
                column = f"{task}@{modality}"
                row[column] = float(value)
                n = float(reply.metrics.get(protocol.metric_key(task, modality, "n"), 0.0))
                if not math.isfinite(n) or n > cases:
                    logger.warning(
                        "%s: %s count %r is not a finite number <= its %d %s case(s); its "
                        "metric is left out of the pooled value",
                        site,
                        column,
                        n,
                        cases,
                        split,
                    )
                elif math.isfinite(value) and n > 0:
                    if not held_out:
                        sums.setdefault(column, []).append((float(value), n))
                    prefix = f"{column}/"
                    (unseen_accepted if held_out else accepted).setdefault(site, {})[column] = {
                        k.removeprefix(prefix): float(v)
                        for k, v in reply.metrics.items()
                        if k.startswith(prefix) and _number(v) is not None
                    }
                    primaries[column] = metric
            (unseen_rows if held_out else per_site)[site] = row
        pooled = {
            c: float(np.average([v for v, _ in vs], weights=[n for _, n in vs]))
            for c, vs in sums.items()
        }
        # intervals, fairness and calibration from the sites' aggregates only (combine_sites)
        combined = combine_sites(accepted, primaries)
        extra: dict[str, Any] = {}
        if holdout:
            silent = sorted(holdout - set(unseen_rows))
            if silent and split == "test":
                logger.warning("holdout site(s) %s reported no evaluation (not connected?)", silent)
            unseen = combine_sites(unseen_accepted, primaries)
            extra["unseen"] = {
                "sites": sorted(holdout),
                "per_site": unseen_rows,
                "pooled": unseen["pooled"],
                "pooled_ci": unseen["pooled_ci"],
                "per_site_ci": unseen["per_site_ci"],
                "per_site_n": {
                    s: {c: m["n"] for c, m in r.items()} for s, r in unseen_accepted.items()
                },
            }
        return {
            "per_site": per_site,
            "pooled": pooled,
            "pooled_ci": combined["pooled_ci"],
            "per_site_ci": combined["per_site_ci"],
            "per_site_se": combined["per_site_se"],
            "per_site_n": {s: {c: m["n"] for c, m in r.items()} for s, r in accepted.items()},
            "fairness": combined["fairness"],
            "calibration": combined["calibration"],
            **extra,
        }

    def _record_results(self, index: int, evaluation: Mapping[str, Any]) -> None:
        results = self.registry.results(self.plan.name) or {"stages": [], "R": [], "R_per_site": {}}
        stage = self.plan.stages[index].name
        if stage not in results["stages"]:
            results["stages"].append(stage)
            results["R"].append(evaluation["pooled"])
            for site, row in evaluation["per_site"].items():
                results["R_per_site"].setdefault(site, {})[stage] = row
            # one entry per R row (a results.json of an older version has none: pad it)
            for key, value in (
                ("R_ci", evaluation.get("pooled_ci", {})),
                ("fairness", evaluation.get("fairness", {})),
                ("calibration", evaluation.get("calibration", {})),
            ):
                rows = results.setdefault(key, [])
                rows += [{}] * (len(results["R"]) - 1 - len(rows))
                rows.append(value)
            for key, by_site in (
                ("R_per_site_ci", evaluation.get("per_site_ci", {})),
                ("R_per_site_se", evaluation.get("per_site_se", {})),
                ("R_per_site_n", evaluation.get("per_site_n", {})),
            ):
                for site, row in by_site.items():
                    results.setdefault(key, {}).setdefault(site, {})[stage] = row
            unseen = evaluation.get("unseen")
            if unseen is not None:  # rows like R's, only when the plan holds sites out
                results["holdout_sites"] = list(unseen["sites"])
                for key, value in (
                    ("unseen", unseen["pooled"]),
                    ("unseen_ci", unseen["pooled_ci"]),
                ):
                    rows = results.setdefault(key, [])
                    rows += [{}] * (len(results["R"]) - 1 - len(rows))
                    rows.append(value)
                for key, by_site in (
                    ("unseen_per_site", unseen["per_site"]),
                    ("unseen_per_site_ci", unseen["per_site_ci"]),
                ):
                    for site, row in by_site.items():
                        results.setdefault(key, {}).setdefault(site, {})[stage] = row
        results["R_ci_method"] = CI_METHOD
        results["R_aggregation"] = AGGREGATION
        results["bytes_up"] = {s.site: s.bytes_up for s in self.sites.values()}
        results["bytes_down"] = {s.site: s.bytes_down for s in self.sites.values()}
        results["epsilon"] = {s.site: s.epsilon for s in self.sites.values()}
        self.registry.save_results(self.plan.name, results)
        self.registry.append_metrics(
            self.plan.name, {"kind": "evaluation", "stage": stage, **evaluation}
        )
