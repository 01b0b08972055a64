"""Train requests of a site: one round of local training, or analytic statistics, once.

:func:`serve_train` answers a train request for :meth:`client.site.Site.train`: it replays
the stored reply of a request already served, checks the request against the site's data
and policy (a refusal is audited), assembles the model, trains it (DP-SGD within the
site's privacy budget when the stage asks for local DP) or computes the sufficient
statistics of its analytic heads, then records the privacy spent, stores the reply and
audits it, in that order, so a crash can never release an update whose cost was not
recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from client import timing
from client.data import CaseDataset
from client.dp import steps_for
from client.errors import RequestRefused
from client.policy import enforce
from client.regularisation import build_regularisers
from client.site_replies import SiteReply
from client.site_statistics import analytic_statistics, segmentation_site_statistics
from client.trainer import DPSettings, TrainResult
from unicon_model.components import set_trainable
from unicon_model.model import UniconModel
from unicon_model.names import check_name, path_under
from unicon_model.protocol import KEY_NUM_EXAMPLES, StageRequest
from unicon_model.schema import ModalitySpec, Plan, StageSpec, TaskSpec

if TYPE_CHECKING:
    from client.site import Site

logger = logging.getLogger(__name__)

__all__ = [
    "Fit",
    "NoiseMultiplier",
    "analytic_statistics",
    "ledger_key",
    "segmentation_site_statistics",
    "serve_train",
    "training_seed",
]

Fit = Callable[..., TrainResult]
"""Local training, as :func:`client.trainer.train`."""

NoiseMultiplier = Callable[..., float]
"""Noise calibration of a DP stage, as :func:`client.dp.stage_noise_multiplier`."""


def serve_train(
    site: Site,
    request: StageRequest,
    arrays: Mapping[str, Tensor],
    *,
    fit: Fit,
    noise_multiplier: NoiseMultiplier,
) -> SiteReply:
    """Serve one train request at ``site`` (see :meth:`client.site.Site.train`).

    Parameters
    ----------
    site
        The site serving the request.
    request, arrays
        The request and the components it carries in full.
    fit
        The local training function (:func:`client.trainer.train`).
    noise_multiplier
        The noise calibration of DP stages (:func:`client.dp.stage_noise_multiplier`).

    Returns
    -------
    SiteReply
        The update (or statistics), the training metrics and the site's config values.
    """
    stage = request.plan.stages[request.stage_index]
    check_name(request.run, "run of the train request")  # it names a folder (regularisers)
    key, model_digest = _request_key(request)
    stored = _replay(site, request, key)
    if stored is not None:
        return stored
    tasks = _objective_tasks(site, request)
    modality = _check_request(site, request, tasks)
    received: list[dict[str, Tensor]] = []
    with timing.phase("model"):
        model = site.models.assemble(request, arrays, received)
    dataset = _training_data(site, request, modality, tasks)
    if stage.is_analytic:
        with timing.phase("train"):
            reply = analytic_statistics(model, dataset, tasks, modality)
        spent: dict[str, float] = {}
    else:
        reply, spent = _local_training(
            site, request, key, model, dataset, tasks, fit=fit, noise_multiplier=noise_multiplier
        )
    with timing.phase("persist"):
        site._store_reply(key, reply)
        # only now: a refused request leaves nothing in the cache
        site.models.cache_received(received)
        _audit_train(site, request, model_digest, reply, spent)
    with timing.phase("dp"):
        config = site._base_config()
    if stage.privacy.mode != "local":  # Opacus wrapped a DP model: never reused
        site.models.keep(request, model)
    return SiteReply(reply.arrays, reply.metrics, config)


def _request_key(request: StageRequest) -> tuple[str, str]:
    """The key of a train request (``run/stage/round/model``) and the digest of its model.

    The model digest covers the digests of every component the request names, so a
    request is answered at most once per (run, stage, round, model).
    """
    stage = request.plan.stages[request.stage_index]
    model_digest = hashlib.sha256(json.dumps(request.digests, sort_keys=True).encode()).hexdigest()
    return f"{request.run}/{stage.name}/{request.server_round}/{model_digest}", model_digest


def _objective_tasks(site: Site, request: StageRequest) -> dict[str, TaskSpec]:
    """The objectives of the request's stage that the site has data for."""
    plan, index = request.plan, request.stage_index
    stage = plan.stages[index]
    return {
        name: spec
        for name, spec in plan.tasks_until(index).items()
        if name in stage.objective_tasks and site._serves(name, spec)
    }


def _training_data(
    site: Site, request: StageRequest, modality: ModalitySpec, tasks: Mapping[str, TaskSpec]
) -> CaseDataset:
    """The site's training cases of the ``modality`` route, for the stage's ``tasks``."""
    plan, index = request.plan, request.stage_index
    return site._dataset(
        split="train",
        modality=modality,
        # a self-supervised task loads every case, so only when it is an objective
        tasks={
            name: spec
            for name, spec in plan.tasks_until(index).items()
            if not spec.self_supervised or name in tasks
        },
        plan=plan,
    )


def _replay(site: Site, request: StageRequest, key: str) -> SiteReply | None:
    """The stored reply of the request ``key`` (audited as a replay); ``None`` if none."""
    stage = request.plan.stages[request.stage_index]
    with timing.phase("persist"):
        stored = site._load_stored_reply(key)
    if stored is None:
        return None
    logger.info("site %s: replaying the stored reply of %s", site.name, key)
    site.audit.append(
        "train-replay", {"key": key, "stage": stage.name, "round": request.server_round}
    )
    return stored


def _route(site: Site, plan: Plan, stage_index: int) -> ModalitySpec:
    """The stage modality whose images the site has (the first, in plan order)."""
    known = plan.modalities_until(stage_index)
    for name in plan.stage_modalities(stage_index):
        spec = known[name]
        if all(k in site.manifest.modalities for k in spec.input_keys):
            return spec
    raise RequestRefused(
        f"site {site.name} has no images for the modalities of stage "
        f"{plan.stages[stage_index].name!r} ({list(plan.stage_modalities(stage_index))}); "
        f"it has {list(site.manifest.modalities)}"
    )


def _check_request(
    site: Site, request: StageRequest, tasks: Mapping[str, TaskSpec]
) -> ModalitySpec:
    """The modality route to train, once the site's data and policy allow the request.

    Raises
    ------
    RequestRefused
        (audited) The site has no images or labels for the stage, or its policy forbids it.
    """
    plan, index = request.plan, request.stage_index
    stage = plan.stages[index]
    try:
        modality = _route(site, plan, index)
        enforce(
            site.policy,
            stage,
            stage_tasks=list(tasks),
            stage_modalities=[modality.name],
            data=plan.data,
        )
        if not tasks:
            raise RequestRefused(
                f"site {site.name} has no labels for the objectives of stage "
                f"{stage.name!r} ({list(stage.objective_tasks)})"
            )
    except RequestRefused as e:
        site.audit.append("refused", {"stage": stage.name, "reason": str(e)})
        raise
    return modality


def _audit_train(
    site: Site,
    request: StageRequest,
    model_digest: str,
    reply: SiteReply,
    spent: Mapping[str, float],
) -> None:
    """Append the ``train`` entry of a served request to the site's audit log."""
    stage = request.plan.stages[request.stage_index]
    site.audit.append(
        "train",
        {
            "run": request.run,
            "stage": stage.name,
            "round": request.server_round,
            "model": model_digest,
            "components": sorted(stage.trained_components),
            "num_examples": reply.metrics.get(KEY_NUM_EXAMPLES, 0),
            "epsilon": site.epsilon(),
            **spent,
            "metrics": {k: v for k, v in reply.metrics.items() if math.isfinite(v)},
        },
    )


def _local_training(
    site: Site,
    request: StageRequest,
    key: str,
    model: UniconModel,
    dataset: CaseDataset,
    tasks: Mapping[str, Any],
    *,
    fit: Fit,
    noise_multiplier: NoiseMultiplier,
) -> tuple[SiteReply, dict[str, float]]:
    """Train the stage's components on the site's training cases; the reply and ε spent."""
    stage = request.plan.stages[request.stage_index]
    if len(dataset) == 0:
        reason = f"site {site.name} has no usable training cases for stage {stage.name!r}"
        site.audit.append("refused", {"stage": stage.name, "reason": reason})
        raise RequestRefused(reason)
    privacy, spent = _privacy_settings(site, stage, len(dataset), noise_multiplier)
    started = time.perf_counter()
    with timing.phase("train"):
        result = _fit(site, request, model, dataset, tasks, privacy=privacy, fit=fit)
    train_s = time.perf_counter() - started
    if privacy is not None:
        with timing.phase("dp"):
            site.ledger.record(
                ledger_key(site, key),
                noise_multiplier=privacy.noise_multiplier,
                sample_rate=spent["sample_rate"],
                steps=int(spent["steps"]),
                stage=stage.name,
                round=request.server_round,
                run=request.run,
            )
    metrics = {
        KEY_NUM_EXAMPLES: float(result.num_examples),
        "steps": float(result.steps),
        "train_s": train_s,
        **result.metrics,
    }
    return SiteReply(result.update, metrics), spent


def _privacy_settings(
    site: Site, stage: StageSpec, num_examples: int, noise_multiplier: NoiseMultiplier
) -> tuple[DPSettings | None, dict[str, float]]:
    """DP-SGD settings of a local-DP stage within the site's budget, and what they spend.

    ``(None, {})`` when the stage is not trained under local DP.

    Raises
    ------
    RequestRefused
        (audited) The site's privacy budget would be exceeded.
    """
    if stage.privacy.mode != "local":
        return None, {}
    batch_size = min(stage.batch_size, num_examples)
    sample_rate, steps = steps_for(num_examples, batch_size, stage.local_epochs)
    try:
        with timing.phase("dp"):
            noise = noise_multiplier(
                target_epsilon=stage.privacy.target_epsilon,
                delta=stage.privacy.delta,
                sample_rate=sample_rate,
                total_steps=steps * stage.rounds,
            )
            site.ledger.check_budget(
                site.policy, noise_multiplier=noise, sample_rate=sample_rate, steps=steps
            )
    except RequestRefused as e:
        site.audit.append("refused", {"stage": stage.name, "reason": str(e)})
        raise
    spent = {"noise_multiplier": noise, "sample_rate": sample_rate, "steps": steps}
    return DPSettings(noise, stage.privacy.max_grad_norm), spent


def _fit(
    site: Site,
    request: StageRequest,
    model: UniconModel,
    dataset: CaseDataset,
    tasks: Mapping[str, Any],
    *,
    privacy: DPSettings | None,
    fit: Fit,
) -> TrainResult:
    """Run ``fit`` on the stage's trainable components, with the stage's regularisers."""
    plan, index = request.plan, request.stage_index
    stage = plan.stages[index]
    set_trainable(model, stage.trained_components)
    regularisers = build_regularisers(
        stage,
        model,
        plan=plan,
        stage_index=index,
        dataset=dataset,
        state_dir=path_under(site.state_dir, "regularisers", check_name(request.run, "run")),
    )
    seed = training_seed(request, site.name, private=privacy is not None)
    return fit(
        model,
        stage,
        dataset,
        tasks=tasks,
        regularisers=regularisers,
        privacy=privacy,
        device=site.device,
        seed=seed,
    )


def training_seed(request: StageRequest, site: str, *, private: bool) -> int | None:
    """The seed of one local training: a secret for DP-SGD, the request's otherwise.

    Under DP-SGD the Gaussian noise is the site's only protection against the
    coordinator, so it must come from a source the coordinator cannot reproduce: the
    trainer draws it (and the Poisson batching) from ``os.urandom`` (``seed=None``, see
    :func:`client.trainer.secret_generator`); nothing in the request enters it. A replay
    of the request is answered from the stored reply, never by training again with the
    same seed. Opacus' own ``secure_mode`` (``PrivacyEngine(secure_mode=True)``) needs the
    ``torchcsprng`` package, which is archived and not built for current PyTorch, so it
    is not used; its floating-point hardening of the noise (``DPOptimizer(...,
    secure_mode=True)``) is independent of the seed.

    Without DP the coordinator receives the update in clear anyway, so the seed is
    derived from the run, stage, round and site (``site``, its name): runs on different
    engines (Flower or in-process, any thread count) then shuffle alike and reproduce
    each other.
    """
    if private:
        return None
    seed_key = f"{request.run}/{request.stage}/{request.server_round}/{site}"
    return int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:4], "little")


def ledger_key(site: Site, key: str) -> str:
    """``key``, or ``key#retrain-N`` when the site's ledger already holds ``key``.

    That happens only when the stored reply of a request was lost or torn after its
    spending was recorded: the new training draws fresh noise, so it is a new release
    and must be counted again (the ledger ignores a key it already holds).
    """
    candidate, n = key, 1
    while site.ledger.has(candidate):
        candidate, n = f"{key}#retrain-{n}", n + 1
    if candidate != key:
        logger.warning(
            "site %s: %s was already spent once; recording this new release as %s",
            site.name,
            key,
            candidate,
        )
    return candidate
