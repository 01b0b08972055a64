"""Evaluate requests of a site: metrics per task and modality route, never on few cases.

:func:`evaluate_request` answers an evaluate request for :meth:`client.site.Site.evaluate`:
it selects the tasks and modality routes the site has data for and its policy allows
(a request the policy leaves nothing to evaluate is refused and audited), assembles the
model, evaluates it on the ``val`` or ``test`` split of every route, withholds the metrics
of routes and tasks with fewer cases than the site's minimum, and audits the metrics
released and what was skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from client import timing
from client.errors import RequestRefused
from client.policy import enforce_data
from client.site_replies import SiteReply
from client.trainer import evaluate
from unicon_model.model import UniconModel
from unicon_model.protocol import KEY_NUM_EXAMPLES, StageRequest, metric_key
from unicon_model.schema import ModalitySpec, TaskSpec

if TYPE_CHECKING:
    from client.site import Site

logger = logging.getLogger(__name__)

EVALUATION_SPLITS = ("val", "test")
"""The only splits an evaluate request may name: training cases never yield metrics."""


@dataclass
class _Scope:
    """What an evaluate request covers at a site.

    Attributes
    ----------
    learned
        Tasks learned through the request's stage that the site has data for.
    tasks
        Those of ``learned`` that the site's policy allows.
    routes
        Modality routes the site has every input image of.
    allowed_routes
        Those of ``routes`` that the site's policy allows.
    skipped
        What is not evaluated (``task``, ``@route`` or ``task@route``) -> why.
    """

    learned: dict[str, TaskSpec]
    tasks: dict[str, TaskSpec]
    routes: list[ModalitySpec]
    allowed_routes: list[ModalitySpec]
    skipped: dict[str, str]


def evaluate_request(
    site: Site, request: StageRequest, arrays: Mapping[str, Tensor]
) -> tuple[SiteReply, int]:
    """Serve one evaluate request at ``site`` (see :meth:`client.site.Site.evaluate`).

    Parameters
    ----------
    site, request, arrays
        The site serving the request, the request and the components it carries in full.

    Returns
    -------
    reply
        The metrics released and the site's config values.
    cases
        The number of cases of the largest route evaluated.
    """
    scope = _scope(site, request)
    _check_request(site, request, scope)
    received: list[dict[str, Tensor]] = []
    with timing.phase("model"):
        model = site.models.assemble(request, arrays, received)
    metrics, total = _metrics(site, request, model, scope)
    for what, reason in scope.skipped.items():
        logger.info("site %s: no evaluation of %s: %s", site.name, what, reason)
    with timing.phase("persist"):
        site.models.cache_received(received)
        site.audit.append(
            "evaluate",
            {
                "run": request.run,
                "stage": request.stage,
                "split": request.split,
                "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
                "skipped": scope.skipped,
            },
        )
    with timing.phase("dp"):
        reply = SiteReply({}, metrics, site._base_config())
    site.models.keep(request, model)
    return reply, total


def _scope(site: Site, request: StageRequest) -> _Scope:
    """The tasks and routes of the request the site has data for and its policy allows."""
    plan, index = request.plan, request.stage_index
    policy = site.policy
    # a self-supervised task is scored only on ``val`` by its own stage's validation
    # (it drives keep-best and patience); it never enters R on ``test``
    objectives = plan.stages[index].objective_tasks if request.split == "val" else ()
    learned = {
        n: t
        for n, t in plan.tasks_until(index).items()
        if site._serves(n, t) and (not t.self_supervised or n in objectives)
    }
    tasks = {
        n: t
        for n, t in learned.items()
        if policy.allowed_tasks is None or n in policy.allowed_tasks
    }
    routes = [
        m
        for m in plan.modalities_until(index).values()
        if all(k in site.manifest.modalities for k in m.input_keys)
    ]
    allowed_routes = [
        m
        for m in routes
        if policy.allowed_modalities is None
        or all(k in policy.allowed_modalities for k in (m.name, *m.input_keys))
    ]
    skipped: dict[str, str] = {}
    for name in sorted(set(learned) - set(tasks)):
        skipped[name] = "task not in the site policy's allowed_tasks"
    for route in routes:
        if route not in allowed_routes:
            skipped[f"@{route.name}"] = "modality not in the site policy's allowed_modalities"
    return _Scope(learned, tasks, routes, allowed_routes, skipped)


def _check_request(site: Site, request: StageRequest, scope: _Scope) -> None:
    """Raise (audited) unless the split and the site's policy allow the request.

    Raises
    ------
    RequestRefused
        For a split other than ``val``/``test``, data settings the policy forbids, or when
        the policy leaves no task or no modality route that the site could evaluate.
    """
    policy = site.policy
    try:
        enforce_data(policy, request.plan.data, stage=request.stage)
        if request.split not in EVALUATION_SPLITS:
            raise RequestRefused(
                f"site {site.name} evaluates only the {list(EVALUATION_SPLITS)} splits, "
                f"not {request.split!r}: metrics on training cases are not released"
            )
        if scope.learned and not scope.tasks:
            raise RequestRefused(
                f"site {site.name}'s policy allows none of the tasks to evaluate "
                f"({sorted(scope.learned)}; allowed_tasks = {list(policy.allowed_tasks or ())})"
            )
        if scope.routes and not scope.allowed_routes:
            raise RequestRefused(
                f"site {site.name}'s policy allows none of the modality routes to evaluate "
                f"({[m.name for m in scope.routes]}; allowed_modalities = "
                f"{list(policy.allowed_modalities or ())})"
            )
    except RequestRefused as e:
        site.audit.append(
            "refused", {"stage": request.stage, "split": request.split, "reason": str(e)}
        )
        raise


def _metrics(
    site: Site, request: StageRequest, model: UniconModel, scope: _Scope
) -> tuple[dict[str, float], int]:
    """Metrics of every allowed route with enough cases; the largest route's case count.

    Routes and tasks with fewer cases than the site's minimum are added to
    ``scope.skipped`` instead.
    """
    minimum = site.min_evaluation_cases
    tasks, skipped = scope.tasks, scope.skipped
    metrics: dict[str, float] = {}
    total = 0
    for modality in scope.allowed_routes if tasks else []:
        dataset = site._dataset(
            split=request.split, modality=modality, tasks=tasks, plan=request.plan
        )
        if len(dataset) == 0:
            continue
        if len(dataset) < minimum:
            skipped[f"@{modality.name}"] = (
                f"{len(dataset)} {request.split} case(s), fewer than the minimum {minimum}"
            )
            continue
        total = max(total, len(dataset))
        with timing.phase("eval"):
            values = evaluate(model, dataset, tasks=tasks, device=site.device)
        for task in tasks:
            n = values.get(f"{task}/n", 0.0)
            if 0 < n < minimum:
                skipped[f"{task}@{modality.name}"] = (
                    f"{int(n)} labelled case(s), fewer than the minimum {minimum}"
                )
        for name, value in values.items():
            task, _, metric = name.partition("/")
            if f"{task}@{modality.name}" not in skipped:
                metrics[metric_key(task, modality.name, metric)] = value
    metrics[KEY_NUM_EXAMPLES] = float(total)
    return metrics, total
