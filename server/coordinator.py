"""The stage driver: runs a plan's pending stages over a :class:`Transport`.

For each stage: query the sites and select the eligible ones (bounded wait for the stage's
minimum), grow the global model by the stage spec, run the stage's rounds (send each site
the components it does not hold yet, collect the trained subset, validate, FedAvg weighted
by examples; analytic stages sum statistics and solve once), checkpoint every round, then
evaluate every learned task on every site and commit a model version with its lineage.
A relaunch resumes from the registry: completed stages are skipped and the stage in
progress continues after its last checkpointed round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from server.eligibility import Eligibility, check_site
from server.errors import RegistryError, StageError
from server.registry import Registry, RunProgress
from server.transport import Incoming, Outgoing, Transport, tensor_bytes
from server.validation import validate_updates, weighted_average
from unicon_model import protocol
from unicon_model.analytic import AnalyticHead, RidgeStatistics, merge_statistics
from unicon_model.checkpoint import Lineage, tensor_digest
from unicon_model.components import load_state, select_state, split_by_component
from unicon_model.layers import pooled_size
from unicon_model.model import UniconModel
from unicon_model.schema import Plan

logger = logging.getLogger(__name__)

PRIMARY_METRIC = {"classification": "accuracy", "survival": "cindex", "segmentation": "dice"}
"""Metric of each task kind entering R[stage, task@modality]."""

ProgressCallback = Callable[[dict[str, Any]], None]


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
        self.run_key = f"{plan.name}-{plan_digest(plan)[:12]}"

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
        """The global model to continue from, and the first round to run."""
        stage = self.plan.stages[index]
        progress = self.registry.progress(self.plan.name)
        if progress.current is not None and progress.current.stage == stage.name:
            resumed = self.registry.load_round(self.plan.name)
            if resumed is not None:
                logger.info("resuming stage %s after round %d", stage.name, progress.current.round)
                return resumed[0], progress.current.round + 1
        if progress.completed:
            model, _ = self.registry.load(progress.completed[-1].version)
        else:
            model = UniconModel(self.plan.model)
        model.grow(stage)
        return model, 1

    # ------------------------------------------------------------------ sites
    def _query(self) -> dict[int, dict[str, Any]]:
        nodes = self.transport.node_ids()
        replies = self.transport.exchange(
            [Outgoing(n, "query") for n in nodes], timeout=self.query_timeout
        )
        capabilities = {}
        answered = {r.node_id for r in replies if r.ok}
        for node, ledger in self.sites.items():
            if node not in answered:
                ledger.capabilities = {}  # gone or silent: not asked again until it answers
        for reply in replies:
            if not reply.ok:
                logger.warning(
                    "node %d did not answer the query: %s", reply.node_id, reply.error_reason
                )
                continue
            caps = json.loads(str(reply.config.get(protocol.KEY_CAPABILITIES, "{}")))
            capabilities[reply.node_id] = caps
            ledger = self.sites.setdefault(reply.node_id, SiteLedger(reply.node_id, caps["site"]))
            ledger.capabilities = caps
            ledger.epsilon = float(caps.get("epsilon", 0.0))
        return capabilities

    def select_sites(self, index: int) -> list[Eligibility]:
        """Eligible sites of a stage, waiting (bounded) for the stage's minimum."""
        stage = self.plan.stages[index]
        deadline = time.monotonic() + self.site_wait
        while True:
            checks = [check_site(self.plan, index, n, caps) for n, caps in self._query().items()]
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
    ) -> list[Incoming]:
        """Send a request; components a node holds (by digest) are not sent again."""

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

        replies = self.transport.exchange([outgoing(n) for n in nodes], timeout=timeout)
        misses = [r.node_id for r in replies if r.error_code == protocol.ERROR_CACHE_MISS]
        if misses:
            logger.info("resending full components to %s (cache miss)", misses)
            retry = {
                r.node_id: r
                for r in self.transport.exchange(
                    [outgoing(n, resend_all=True) for n in misses], timeout=timeout
                )
            }
            replies = [retry.get(r.node_id, r) for r in replies]
        for reply in replies:
            site = self.sites[reply.node_id]
            site.bytes_up += tensor_bytes(reply.arrays)
            if reply.ok:
                site.cached = set(json.loads(str(reply.config.get(protocol.KEY_CACHED, "[]"))))
                site.epsilon = float(json.loads(str(reply.config.get(protocol.KEY_EPSILON, "0"))))
            else:
                logger.warning(
                    "%s: %s error %s: %s",
                    site.site,
                    message_type,
                    reply.error_code,
                    reply.error_reason,
                )
        return replies

    # ------------------------------------------------------------------ stage
    def run_stage(self, index: int) -> str:
        """Run one stage to the end; return the committed version."""
        stage = self.plan.stages[index]
        eligible = self.select_sites(index)
        nodes = [e.node_id for e in eligible]
        model, first_round = self._starting_model(index)
        logger.info(
            "stage %s: %d site(s) %s, rounds %d..%d",
            stage.name,
            len(nodes),
            [e.site for e in eligible],
            first_round,
            stage.rounds,
        )
        rounds = 1 if stage.is_analytic else stage.rounds
        for round_ in range(first_round, rounds + 1):
            started = time.perf_counter()
            if stage.is_analytic:
                record = self._analytic_round(index, model, nodes)
            else:
                record = self._train_round(index, round_, model, nodes)
            record.update(stage=stage.name, round=round_, wall_s=time.perf_counter() - started)
            lineage = Lineage(
                plan=self.plan.name, stage=stage.name, stage_index=index, rounds=round_
            )
            self.registry.save_round(self.plan.name, stage.name, round_, model, lineage)
            self.registry.append_metrics(self.plan.name, {"kind": "round", **record})
            self.on_progress({"kind": "round", **record})
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
            rounds=rounds,
            epsilon={self.sites[n].site: self.sites[n].epsilon for n in self.sites},
            metrics={k: v for k, v in pooled.items() if math.isfinite(v)},
        )
        version = self.registry.commit(model, lineage=lineage, data=self.plan.data)
        self.registry.complete_stage(self.plan.name, stage.name, version)
        self._record_results(index, evaluation)
        self.on_progress(
            {"kind": "stage", "stage": stage.name, "version": version, "metrics": pooled}
        )
        return version

    def _train_round(
        self, index: int, round_: int, model: UniconModel, nodes: list[int]
    ) -> dict[str, Any]:
        stage = self.plan.stages[index]
        if stage.secure_aggregation:
            return self._secure_round(index, round_, model, nodes)
        request, components = self._request(index, round_, model)
        replies = self._send("train", nodes, request, components, stage.round_timeout)
        reference = select_state(model, stage.trained_components)
        ok = [r for r in replies if r.ok]
        verdicts = validate_updates({self.sites[r.node_id].site: r.arrays for r in ok}, reference)
        accepted = [r for r, v in zip(ok, verdicts, strict=True) if v.accepted]
        rejected = {v.site: v.reason for v in verdicts if not v.accepted}
        failed = {self.sites[r.node_id].site: r.error_reason for r in replies if not r.ok}
        if not accepted:
            raise StageError(
                f"stage {stage.name!r} round {round_}: no valid update "
                f"(rejected: {rejected}, failed: {failed})"
            )
        weights = [float(r.metrics[protocol.KEY_NUM_EXAMPLES]) for r in accepted]
        merged = weighted_average([r.arrays for r in accepted], weights)
        load_state(model, merged, components=stage.trained_components)
        total = sum(weights)
        loss = (
            sum(
                float(r.metrics.get("loss", math.nan)) * w
                for r, w in zip(accepted, weights, strict=True)
            )
            / total
        )
        return {
            "sites": [self.sites[r.node_id].site for r in accepted],
            "loss": loss,
            "site_loss": {
                self.sites[r.node_id].site: float(r.metrics.get("loss", math.nan)) for r in accepted
            },
            "num_examples": total,
            "rejected": rejected,
            "failed": failed,
        }

    def _analytic_round(self, index: int, model: UniconModel, nodes: list[int]) -> dict[str, Any]:
        stage = self.plan.stages[index]
        if stage.secure_aggregation:
            return self._secure_round(index, 1, model, nodes)
        request, components = self._request(index, 1, model)
        replies = [
            r for r in self._send("train", nodes, request, components, stage.round_timeout) if r.ok
        ]
        if not replies:
            raise StageError(f"analytic stage {stage.name!r}: no site returned statistics")
        for task in stage.add_tasks:
            prefix = f"{task.name}{protocol.STATISTICS_SEPARATOR}"
            per_site = [
                RidgeStatistics.from_arrays(
                    {
                        k[len(prefix) :]: v.double().numpy()
                        for k, v in r.arrays.items()
                        if k.startswith(prefix)
                    }
                )
                for r in replies
                if any(k.startswith(prefix) for k in r.arrays)
            ]
            weight, bias = merge_statistics(per_site).solve(l2=task.l2)
            head = model.tasks[task.name]
            assert isinstance(head, AnalyticHead)
            head.set_solution(weight, bias)
        return {
            "sites": [self.sites[r.node_id].site for r in replies],
            "num_examples": sum(
                float(r.metrics.get(protocol.KEY_NUM_EXAMPLES, 0)) for r in replies
            ),
        }

    def _secure_round(
        self, index: int, round_: int, model: UniconModel, nodes: list[int]
    ) -> dict[str, Any]:
        """One round through SecAgg+: only the weighted mean of the sites' vectors is seen.

        Training stages receive the mean *change* of the trained components; analytic
        stages the sum of the statistics (mean of ``statistics / n`` times the total ``n``).
        Per-site update validation is impossible by design; the mean is checked instead.
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
        counts = [
            float(self.sites[n].capabilities.get("counts", {}).get("cases", {}).get("train", 0))
            for n in nodes
        ]
        max_weight = max([*counts, 1.0])
        for node in nodes:
            self.sites[node].bytes_down += tensor_bytes(arrays)
        result = self.transport.secure_weighted_mean(
            nodes,
            config=request.to_config(),
            arrays=arrays,
            reply_shapes=reply_shapes,
            spec=stage.secagg,
            max_weight=max_weight,
            server_round=round_,
        )
        values = sum(math.prod(shape) for shape in reply_shapes.values())
        for node in result.num_examples:
            # masked vectors travel as 64-bit integers, one per value plus the weight
            self.sites[node].bytes_up += 8 * (values + 1)
            self.sites[node].epsilon = result.metrics[node].get("epsilon", self.sites[node].epsilon)
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
            "rejected": {},
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
        bad = [k for k, v in result.mean.items() if not bool(v.isfinite().all())]
        if bad:
            raise StageError(
                f"stage {stage.name!r} round {round_}: the securely aggregated update has "
                f"NaN/Inf in {bad}; the round is discarded"
            )
        if stage.is_analytic:
            for task in stage.add_tasks:
                prefix = f"{task.name}{protocol.STATISTICS_SEPARATOR}"
                summed = {
                    k[len(prefix) :]: (v * total).numpy()
                    for k, v in result.mean.items()
                    if k.startswith(prefix)
                }
                summed["count"] = np.rint(summed["count"])  # undo quantisation of the count
                weight, bias = RidgeStatistics.from_arrays(summed).solve(l2=task.l2)
                head = model.tasks[task.name]
                assert isinstance(head, AnalyticHead)
                head.set_solution(weight, bias)
        else:
            reference = select_state(model, stage.trained_components)
            merged = {
                k: (reference[k].double() + result.mean[k]).to(reference[k].dtype)
                for k in reference
            }
            load_state(model, merged, components=stage.trained_components)
        losses = [
            (result.metrics[n].get("loss", math.nan), w) for n, w in result.num_examples.items()
        ]
        record["loss"] = sum(v * w for v, w in losses) / total if total else math.nan
        record["site_loss"] = {
            self.sites[n].site: v for n, (v, _) in zip(result.num_examples, losses, strict=True)
        }
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, index: int, model: UniconModel, split: str = "test") -> dict[str, Any]:
        """Every learned task on every site that has it: per-site and pooled primary metrics.

        Pooled values are case-weighted means of the sites' metrics.
        """
        self._query()
        nodes = [n for n, s in self.sites.items() if s.capabilities]
        request, components = self._request(index, 0, model, split=split)
        replies = self._send("evaluate", nodes, request, components, self.evaluate_timeout)
        tasks = self.plan.tasks_until(index)
        per_site: dict[str, dict[str, float]] = {}
        sums: dict[str, list[tuple[float, float]]] = {}
        for reply in replies:
            if not reply.ok:
                continue
            site = self.sites[reply.node_id].site
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
                if math.isfinite(value) and n > 0:
                    sums.setdefault(column, []).append((float(value), n))
            per_site[site] = row
        pooled = {
            c: float(np.average([v for v, _ in vs], weights=[n for _, n in vs]))
            for c, vs in sums.items()
        }
        return {"per_site": per_site, "pooled": pooled}

    def _record_results(self, index: int, evaluation: Mapping[str, Any]) -> None:
        results = self.registry.results(self.plan.name) or {"stages": [], "R": [], "R_per_site": {}}
        stage = self.plan.stages[index].name
        if stage not in results["stages"]:
            results["stages"].append(stage)
            results["R"].append(evaluation["pooled"])
            for site, row in evaluation["per_site"].items():
                results["R_per_site"].setdefault(site, {})[stage] = row
        results["bytes_up"] = {s.site: s.bytes_up for s in self.sites.values()}
        results["bytes_down"] = {s.site: s.bytes_down for s in self.sites.values()}
        results["epsilon"] = {s.site: s.epsilon for s in self.sites.values()}
        self.registry.save_results(self.plan.name, results)
        self.registry.append_metrics(
            self.plan.name, {"kind": "evaluation", "stage": stage, **evaluation}
        )
