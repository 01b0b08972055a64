"""Choosing the analytic segmentation head's options on the sites' validation splits.

The analytic head of :mod:`simulations.bench_analytic_seg` has options no data picks for
it: the class-balance ``foreground_prior``, the ridge penalty ``l2``, the parameter-free
voxel features ``analytic_features`` and the number of ``analytic_random_features``.
Its stage is one round of statistics that the coordinator never validates (validation runs
only in gradient stages, :meth:`server.coordinator.Coordinator._validates`), so each
candidate's head is scored after its run by the coordinator's own evaluation on the sites'
``val`` splits (:func:`validation_dice`: the case-weighted pooled Dice, as a gradient
stage's validation pools it). :func:`select_candidate` picks the best validated candidate;
only its ``test`` Dice is then reported as the analytic figure, the test Dice of the others
are shown, never used to choose.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATE_FEATURES",
    "CANDIDATE_L2",
    "CANDIDATE_PRIORS",
    "CANDIDATE_RANDOM_FEATURES",
    "candidate_grid",
    "candidate_name",
    "grid_text",
    "options_text",
    "select_candidate",
    "validation_dice",
]

CANDIDATE_PRIORS: tuple[float, ...] = (0.05, 0.1, 0.2)
"""The ``foreground_prior`` values tried (class-balance weights, see
:func:`unicon_model.analytic.voxel_class_weights`)."""

CANDIDATE_RANDOM_FEATURES: tuple[int, ...] = (0,)
"""The ``analytic_random_features`` counts tried (64 never won on val, 2026-12-02)."""

CANDIDATE_FEATURES: tuple[tuple[str, ...], ...] = ((), ("intensity", "squares"))
"""The ``analytic_features`` sets tried: the pyramid alone, and with the input's intensity
and every feature's square."""

CANDIDATE_L2: tuple[float, ...] = (1.0, 0.1)
"""The ridge penalties ``l2`` tried (1.0 is the task's default)."""

_FEATURE_LETTERS = {"context": "c", "intensity": "i", "squares": "s"}


def candidate_grid(
    priors: Iterable[float] = CANDIDATE_PRIORS,
    random_features: Iterable[int] = CANDIDATE_RANDOM_FEATURES,
    base: Mapping[str, Any] | None = None,
    *,
    features: Iterable[Sequence[str]] = ((),),
    l2: Iterable[float] = (1.0,),
) -> list[dict[str, Any]]:
    """Head options of every candidate: ``base`` (default ``class_balance = True``) with
    each ``analytic_features`` set, ``l2``, ``analytic_random_features`` and
    ``foreground_prior``. The bench's grid is ``candidate_grid(features=CANDIDATE_FEATURES,
    l2=CANDIDATE_L2)``.

    Ordered by feature set, then ``l2``, random features and prior (each as given): the
    order :func:`select_candidate` breaks ties by, so with the defaults a tie goes to the
    fewer features (smaller statistics to upload), the default penalty and the smaller prior.
    """
    head = dict(base) if base is not None else {"class_balance": True}
    priors, random_features, l2 = list(priors), list(random_features), list(l2)
    return [
        {
            **head,
            "foreground_prior": float(p),
            "analytic_random_features": int(r),
            **({"analytic_features": list(f)} if f else {}),
            **({"l2": float(penalty)} if penalty != 1.0 else {}),
        }
        for f in features
        for penalty in l2
        for r in random_features
        for p in priors
    ]


def candidate_name(options: Mapping[str, Any]) -> str:
    """The run (and work folder) name of a candidate, e.g. ``seg-analytic-p0.05-rf64`` or
    ``seg-analytic-p0.1-rf0-l2_0.1-fis`` (``analytic_features`` by initials)."""
    prior = options.get("foreground_prior")
    features = int(options.get("analytic_random_features", 0))
    balance = "" if options.get("class_balance", True) else "-nobal"
    penalty = float(options.get("l2", 1.0))
    extras = "".join(_FEATURE_LETTERS[f] for f in options.get("analytic_features", ()))
    name = f"seg-analytic-p{prior:g}-rf{features}{balance}"
    return name + (f"-l2_{penalty:g}" if penalty != 1.0 else "") + (f"-f{extras}" if extras else "")


def options_text(options: Mapping[str, Any]) -> str:
    """``prior 0.05, 64 RF`` (``, l2 0.1``, ``, intensity+squares`` when set) for a
    candidate's head options."""
    text = f"prior {options.get('foreground_prior', 0.01):g}"
    text += f", {int(options.get('analytic_random_features', 0))} RF"
    if float(options.get("l2", 1.0)) != 1.0:
        text += f", l2 {float(options['l2']):g}"
    if options.get("analytic_features"):
        text += ", " + "+".join(options["analytic_features"])
    return text if options.get("class_balance", True) else text + ", unbalanced"


def grid_text(entry: Mapping[str, Any]) -> str:
    """The chosen candidate and every candidate's val/test Dice, for the table row of
    :func:`simulations.bench_analytic_seg.bench_analytic_seg`'s entry."""
    rows = ", ".join(
        f"{options_text(c['head_options'])} {c['val_dice']:.3f}/{c['dice']:.3f}"
        for c in entry["grid"]
    )
    return (
        f"chosen on val: {options_text(entry['head_options'])} (val Dice "
        f"{entry['analytic']['val_dice']:.3f}) of val/test Dice {rows}"
    )


def select_candidate(rows: Sequence[Mapping[str, Any]], key: str = "val_dice") -> int | None:
    """Index of the row with the highest finite ``key`` (the validation Dice).

    A row whose ``key`` is missing, ``None`` or not a finite number is never chosen; a tie
    goes to the earliest row (grid order, see :func:`candidate_grid`). ``None`` when no row
    has a finite value.
    """
    best: int | None = None
    best_value = -math.inf
    for index, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value) and (best is None or value > best_value):
            best, best_value = index, float(value)
    return best


def validation_dice(
    raw: Mapping[str, Any], sites: Sequence[Path], run_dir: Path, route: str
) -> float:
    """Pooled ``val`` Dice of ``route`` of the final model of the one-stage plan ``raw``
    run under ``run_dir`` (``run_federated``'s ``work/<name>``).

    A fresh :class:`server.coordinator.Coordinator` over the run's registry and the sites
    (their state under ``run_dir/state``) evaluates that model on the ``val`` split: the
    case-weighted mean of the sites' Dice, held-out sites left out, as a gradient stage's
    validation pools it. NaN when no site reported the route.
    """
    from server.coordinator import Coordinator
    from server.registry import Registry
    from simulations.baselines import final_model
    from simulations.inprocess import InProcessTransport
    from unicon_model.schema import validate_plan

    plan = validate_plan(dict(raw))
    registry = Registry(run_dir / "registry")
    model = final_model(run_dir / "registry", plan.name)
    transport = InProcessTransport(list(sites), run_dir / "state")
    coordinator = Coordinator(plan, registry, transport, site_wait=0)
    evaluation = coordinator.evaluate(len(plan.stages) - 1, model, split="val")
    value = evaluation["pooled"].get(route)
    if value is None or not math.isfinite(value):
        logger.warning("%s: no site reported a val Dice of %s", run_dir.name, route)
        return math.nan
    return float(value)
