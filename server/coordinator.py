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
progress continues after its last checkpointed round, with its best round so far. How a
round aggregates (plain FedAvg, analytic statistics, SecAgg+) is the stage's round strategy
(:mod:`server.rounds`, chosen by :func:`server.rounds.select_strategy`); this module keeps
the stage loop: selection, rounds, validation, checkpoints, evaluation and results.

Every "pooled" metric here (``R``, the validation score) is the case-weighted mean of the
sites' own metrics, each computed by the site over its own cases, not one metric over the
union of the cases: that would need every case's prediction and label at the coordinator,
which the sites do not release (a per-case prediction or label is patient data).

Every reply is untrusted (a site may be faulty or malicious) and is checked on its own
(:mod:`server.round_checks`); a merged model that is not finite is never loaded,
checkpointed or committed: the round fails with a :class:`StageError` and the registry
keeps its previous state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from server.analytic_updates import counted_sites
from server.best_round import BestRound, kept_metrics
from server.eligibility import Eligibility
from server.errors import RegistryError, StageError
from server.evaluation import evaluation_lineage_metrics, pool_evaluation, validation_summary
from server.registry import Registry, RunProgress
from server.results import record_results
from server.resume import resumed_best, starting_point
from server.round_checks import require_finite
from server.rounds import RoundContext, RoundStrategy, select_strategy
from server.site_link import SiteLink
from server.sites import SiteLedger
from server.timing import PhaseClock
from server.transport import Transport
from unicon_model.checkpoint import Lineage, PretrainedRecord
from unicon_model.model import UniconModel
from unicon_model.schema import Plan

logger = logging.getLogger(__name__)


ProgressCallback = Callable[[dict[str, Any]], None]


def plan_digest(plan: Plan) -> str:
    """Identity of a plan's content (a relaunch must use the same plan to resume).

    A ``[model.pretrained]`` file pinned by its ``sha256`` is identified by that pin, not by
    where it lies: its ``path`` is left out, so the same pinned weights give the same run key
    (and the same seeds at the sites) from any folder. Every other plan digests its JSON as
    it always did.
    """
    pretrained = plan.model.pretrained
    if pretrained is None or pretrained.sha256 is None:
        return hashlib.sha256(plan.model_dump_json().encode()).hexdigest()
    located = plan.model_dump(mode="json")
    del located["model"]["pretrained"]["path"]
    return hashlib.sha256(json.dumps(located, sort_keys=True).encode()).hexdigest()


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
        self.evaluate_timeout = evaluate_timeout
        self.on_progress = on_progress or (lambda _: None)
        self.run_key = f"{plan.name}-{plan_digest(plan)[:12]}"
        self.clock = PhaseClock()
        """Where the time of the round (or stage phase) in progress goes (:mod:`server.timing`)."""
        self.link = SiteLink(
            plan,
            transport,
            self.clock,
            run_key=self.run_key,
            query_timeout=query_timeout,
            site_wait=site_wait,
        )
        """The sites: query, selection, requests and their replies."""
        self.strategies: dict[int, RoundStrategy] = {}
        """Stage index -> the round strategy of its run in progress (or last run)."""

    @property
    def sites(self) -> dict[int, SiteLedger]:
        """Node id -> what the coordinator knows of its site."""
        return self.link.sites

    @property
    def refused(self) -> dict[int, Eligibility]:
        """Nodes refused at the last query (malformed capabilities, duplicate site name)."""
        return self.link.refused

    def select_sites(self, index: int) -> list[Eligibility]:
        """Eligible sites of a stage, waiting (bounded) for the stage's minimum. An analytic
        update stage leaves out the sites whose statistics its heads hold already."""
        self.link.counted = (
            counted_sites(
                self.plan,
                index,
                self.registry.progress(self.plan.name).completed_stages,
                self.registry.metrics(self.plan.name),
            )
            if self.plan.stages[index].update_analytic
            else {}
        )
        return self.link.select_sites(index)

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

        On a resume, :attr:`resumed_lineage` is the round checkpoint's lineage (else ``None``);
        :attr:`pretrained` is the ``[model.pretrained]`` file the first stage started from.
        """
        self.resumed_lineage: Lineage | None = None
        self.pretrained: PretrainedRecord | None = None
        start = starting_point(self.plan, self.registry, index)
        self.resumed_lineage, self.pretrained = start.resumed_lineage, start.pretrained
        return start.model, start.first_round

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
        self.strategies[index] = select_strategy(stage)
        rounds = 1 if stage.is_analytic else stage.rounds
        best = resumed_best(self.plan, self.registry, index, first_round, self.resumed_lineage)
        last_round = first_round - 1
        for round_ in range(first_round, rounds + 1):
            if self._patience_spent(index, best):
                break
            self._run_round(index, round_, rounds, model, nodes, best)
            last_round = round_
        kept = best.restore(model, last_round, stage.name) if stage.keep_best else last_round
        self.clock.reset()
        finishing = time.perf_counter()
        with self.clock.phase("evaluation"):
            evaluation = self.evaluate(index, model)
        version = self._commit(index, model, nodes, evaluation, last_round, kept, best)
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
            {
                "kind": "stage",
                "stage": stage.name,
                "version": version,
                "metrics": evaluation["pooled"],
            }
        )
        return version

    def _run_round(
        self,
        index: int,
        round_: int,
        rounds: int,
        model: UniconModel,
        nodes: list[int],
        best: BestRound,
    ) -> None:
        """One round of the stage loop: aggregate, validate, checkpoint, record and report."""
        stage = self.plan.stages[index]
        started = time.perf_counter()
        self.clock.reset()
        with self.clock.phase("aggregation"):
            record = self._train_round(index, round_, model, nodes)
            self._require_finite(
                model.state_dict(), f"stage {stage.name!r} round {round_}: the global model"
            )
        with self.clock.phase("validation"):
            if self._validates(index, round_, rounds):
                self._validate_round(index, round_, model, nodes, best, record)
                if record.get("stopped_early"):
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
            self.registry.prune_best(self.plan.name, keep=best.round if stage.keep_best else None)
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

    def _train_round(
        self, index: int, round_: int, model: UniconModel, nodes: list[int]
    ) -> dict[str, Any]:
        """One round of stage ``index`` (training, analytic or secure) by its round strategy.

        The strategy is the one :meth:`run_stage` chose (:attr:`strategies`), else the
        stage's (:func:`server.rounds.select_strategy`). Returns the round's record.
        """
        strategy = self.strategies.get(index)
        if strategy is None:
            strategy = self.strategies[index] = select_strategy(self.plan.stages[index])
        return strategy.run(RoundContext(self.link, index, round_, model, nodes))

    _require_finite = staticmethod(require_finite)

    def _commit(
        self,
        index: int,
        model: UniconModel,
        nodes: list[int],
        evaluation: Mapping[str, Any],
        last_round: int,
        kept: int,
        best: BestRound,
    ) -> str:
        """Commit the stage's model with its lineage, complete the stage, record results."""
        stage = self.plan.stages[index]
        completed = self.registry.progress(self.plan.name).completed
        lineage = Lineage(
            plan=self.plan.name,
            stage=stage.name,
            stage_index=index,
            parent=completed[-1].version if completed else None,
            sites=sorted(self.sites[n].site for n in nodes),
            rounds=last_round,
            epsilon={self.sites[n].site: self.sites[n].epsilon for n in self.sites},
            metrics={
                **{k: v for k, v in evaluation["pooled"].items() if math.isfinite(v)},
                **kept_metrics(kept, best),
                **evaluation_lineage_metrics(evaluation),
            },
            pretrained=self.pretrained,
        )
        self._require_finite(model.state_dict(), f"stage {stage.name!r}: the global model")
        with self.clock.phase("commit"):
            version = self.registry.commit(model, lineage=lineage, data=self.plan.data)
            self.registry.complete_stage(self.plan.name, stage.name, version)
            self._record_results(index, evaluation)
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
        validation = validation_summary(evaluation, columns)
        if validation["score"] is None:
            logger.warning(
                "stage %s round %d: no site reported a validation metric of %s",
                stage.name,
                round_,
                sorted(columns),
            )
        return validation

    def _validate_round(
        self,
        index: int,
        round_: int,
        model: UniconModel,
        nodes: list[int],
        best: BestRound,
        record: dict[str, Any],
    ) -> None:
        """Validate the round, keep it if best (``keep_best``), note it and any early stop.

        The round loop (:meth:`_run_round`) logs the early stop that ``record`` notes.
        """
        stage = self.plan.stages[index]
        validation = self.validate(index, round_, model, nodes)
        record.update(val=validation, val_score=validation["score"])
        if best.update(round_, validation["score"], stage.min_delta) and stage.keep_best:
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

        "Pooled" values are case-weighted means of the sites' metrics
        (:data:`server.results.AGGREGATION`): a metric over the union of the cases would need
        each case's prediction and label, which a site does not release. ``nodes`` (default:
        every node that answers a fresh query) are the sites asked; ``round_`` is the
        request's round (0 after a stage).
        Sites in the plan's ``[evaluation] holdout_sites`` are left out of every value above
        and reported under ``unseen`` instead (``sites``, ``per_site``, ``pooled``,
        ``pooled_ci``, ``per_site_ci``, ``per_site_n``), only when the plan holds sites out.
        """
        if nodes is None:
            self.link.query()
            nodes = [n for n, s in self.sites.items() if s.capabilities]
        else:
            nodes = [n for n in nodes if n in self.sites and self.sites[n].capabilities]
        request, components = self.link.request(index, round_, model, split=split)
        replies, malformed = self.link.send(
            "evaluate", nodes, request, components, self.evaluate_timeout
        )
        tasks = {
            name: spec
            for name, spec in self.plan.tasks_until(index).items()
            # a self-supervised task's score drives its stage's validation only, never R
            if split == "val" or not spec.self_supervised
        }
        holdout = set(self.plan.evaluation.holdout_sites)
        return pool_evaluation(replies, malformed, self.sites, tasks, split, holdout)

    def _record_results(self, index: int, evaluation: Mapping[str, Any]) -> None:
        """Add a completed stage's evaluation to the plan's results and metrics."""
        stage = self.plan.stages[index].name
        record_results(self.registry, self.plan.name, stage, evaluation, self.sites.values())
