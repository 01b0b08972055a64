"""Where a stage starts: a fresh grown model or the resumed round checkpoint, and its best.

A relaunch resumes from the registry: the stage in progress continues after its last
checkpointed round (:func:`starting_point`), with its best round so far
(:func:`resumed_best`). The first stage of a plan starts from ``[model.pretrained]`` if set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.best_round import BestRound
from server.errors import RegistryError
from server.registry import Registry
from unicon_model.checkpoint import Lineage, PretrainedRecord
from unicon_model.model import UniconModel
from unicon_model.pretrained import read_pretrained, seed_from_pretrained
from unicon_model.schema import Plan

logger = logging.getLogger(__name__)


@dataclass
class StartingPoint:
    """The global model a stage continues from.

    Attributes
    ----------
    model
        The model: the round checkpoint on a resume, else the last version (or a new
        model) grown by the stage.
    first_round
        The first round to run.
    resumed_lineage
        The round checkpoint's lineage on a resume, else ``None``.
    pretrained
        The ``[model.pretrained]`` file the first stage started from, else ``None``.
    """

    model: UniconModel
    first_round: int
    resumed_lineage: Lineage | None = None
    pretrained: PretrainedRecord | None = None


def starting_point(plan: Plan, registry: Registry, index: int) -> StartingPoint:
    """The global model stage ``index`` continues from, and the first round to run."""
    stage = plan.stages[index]
    progress = registry.progress(plan.name)
    # the first stage starts from [model.pretrained] if set; its version's lineage records it
    pretrained = None if progress.completed else plan.model.pretrained
    if progress.current is not None and progress.current.stage == stage.name:
        resumed = registry.load_round(plan.name)
        if resumed is not None:
            logger.info("resuming stage %s after round %d", stage.name, progress.current.round)
            start = StartingPoint(resumed[0], progress.current.round + 1, resumed[1].lineage)
            if pretrained is not None:  # seeded before the crash: record the same file
                path, kind, sha256, _ = read_pretrained(pretrained)
                start.pretrained = PretrainedRecord(path=str(path), sha256=sha256, format=kind)
            return start
    if progress.completed:
        model, _ = registry.load(progress.completed[-1].version)
    else:
        model = UniconModel(plan.model)
    model.grow(stage)
    start = StartingPoint(model, 1)
    if pretrained is not None:  # a bad file fails here, before any round or commit
        start.pretrained = seed_from_pretrained(model, pretrained).record()
    return start


def resumed_best(
    plan: Plan, registry: Registry, index: int, first_round: int, lineage: Lineage | None
) -> BestRound:
    """The best round so far: restored from the round checkpoint's ``lineage`` on a resume.

    The round checkpoint's lineage holds the best round, its score and the validations
    since; the best model is ``best-<round>`` in the registry. Without that checkpoint
    (damaged or deleted) the best-tracking restarts from the resumed round, logged.
    """
    stage = plan.stages[index]
    if first_round == 1 or lineage is None:
        return BestRound()
    best = BestRound.from_metrics(lineage.metrics)
    if best.round is None or not stage.keep_best:
        return best
    try:
        kept = registry.load_best(plan.name, stage.name, best.round)
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
