"""A hospital site serving the coordinator's requests. No Flower here.

:class:`Site` owns the site's manifest, policy and state directory (audit log, privacy
ledger, component cache, preprocessed-data cache, stored replies) and answers the three
requests of :mod:`unicon_model.protocol`: capabilities, train and evaluate. The ClientApp is
a thin adapter around it.

A train request is answered at most once per (run, stage, round, model): a replay after a
coordinator crash returns the stored reply, so nothing new is released and no privacy is
spent twice. Privacy spending is recorded in the ledger *before* the reply is stored and
returned, so a crash can never release an update whose cost was not recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from client import timing
from client.audit import AuditLog
from client.component_cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FILE_BYTES,
    ComponentCache,
    load_safetensors,
)
from client.data import CaseDataset, build_dataset
from client.dp import stage_noise_multiplier, steps_for
from client.errors import RequestRefused, SiteError
from client.ledger import PrivacyLedger
from client.manifest import SiteManifest, load_manifest
from client.policy import SitePolicy, default_policy, enforce, enforce_data, load_policy
from client.regularisation import build_regularisers
from client.trainer import DPSettings, evaluate, train
from unicon_model.analytic import RidgeStatistics, one_hot_targets
from unicon_model.checkpoint import tensor_digest
from unicon_model.components import key_prefix, load_state, select_state, set_trainable
from unicon_model.durable import Content, atomic_write, file_lock
from unicon_model.model import UniconModel
from unicon_model.names import check_name, path_under
from unicon_model.protocol import (
    KEY_CACHED,
    KEY_EPSILON,
    KEY_NUM_EXAMPLES,
    KEY_SITE,
    StageRequest,
    metric_key,
)
from unicon_model.schema import ModalitySpec, Plan, TaskSpec

logger = logging.getLogger(__name__)

MIN_EVALUATION_CASES = 2
"""Default smallest split a route is evaluated on: metrics of fewer cases are withheld.

A metric over one case gives that case's label (or the model's hit on it) away. Two is the
floor the shipped synthetic sites allow (their test splits hold 2-4 cases); a hospital
should raise it with ``Site(min_evaluation_cases=...)``.
"""

_MAX_REPLY_JSON_BYTES = 16 * 1024**2
"""Bound on a stored reply's JSON (metrics only: a few kB in practice)."""

EVALUATION_SPLITS = ("val", "test")
"""The only splits an evaluate request may name: training cases never yield metrics."""


def _restrict(path: Path, mode: int) -> None:
    """Set ``path``'s permission bits to ``mode`` where the site owns it (logged otherwise)."""
    try:
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
    except OSError as e:
        logger.warning("cannot set mode %o on %s: %s", mode, path, e)


def _write_reply_file(path: Path, content: Content) -> None:
    """Write a stored reply's file atomically, without fsync (see :meth:`Site._store_reply`).

    A process crash leaves the old file or the new one; a power loss may leave neither, or a
    torn one, which is detected when the reply is loaded.
    """
    atomic_write(
        path, content, fsync=False, fsync_dir=False, prefix=f".tmp-{path.name}-", suffix=""
    )


class CacheMiss(RequestRefused):
    """The request referenced components by digest that the site does not hold.

    The coordinator answers by resending those components in full.
    """

    def __init__(self, components: list[str]) -> None:
        self.components = components
        super().__init__(f"cache miss: resend component(s) {components}")


@dataclass(frozen=True)
class SiteReply:
    """A site's answer: tensors, metrics and config values (see the protocol module)."""

    arrays: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)


class Site:
    """One hospital's data, policy and state, answering coordinator requests.

    Parameters
    ----------
    manifest_path
        The site manifest (YAML/JSON).
    state_dir
        The site's state directory (created if missing).
    policy_path
        The site's policy file; ``None`` uses :func:`client.policy.default_policy`.
    device
        Training device (default: CUDA if present, else CPU).
    cache_max_bytes
        Size limit of the component cache (least recently used entries are evicted after
        each put); ``None`` for no limit.
    max_file_bytes
        Largest safetensors file (cache entry, stored reply) the site reads back; bigger
        files are refused before they are decoded.
    min_evaluation_cases
        Routes whose evaluation split has fewer cases (or tasks with fewer labelled cases)
        get no metrics; see :data:`MIN_EVALUATION_CASES`.
    """

    def __init__(
        self,
        *,
        manifest_path: str | Path,
        state_dir: str | Path,
        policy_path: str | Path | None = None,
        device: torch.device | None = None,
        cache_max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        min_evaluation_cases: int = MIN_EVALUATION_CASES,
    ) -> None:
        if min_evaluation_cases < 1:
            raise ValueError(f"min_evaluation_cases must be >= 1, got {min_evaluation_cases}")
        self.manifest: SiteManifest = load_manifest(manifest_path)
        self.policy: SitePolicy = load_policy(policy_path) if policy_path else default_policy()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _restrict(self.state_dir, 0o700)
        self.max_file_bytes = max_file_bytes
        # the site's policy may raise (or lower) the minimum; the constructor gives the default
        self.min_evaluation_cases = self.policy.min_evaluation_cases or min_evaluation_cases
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.ledger = PrivacyLedger(self.state_dir / "privacy" / "ledger.json", anchor=self.audit)
        # fail closed before serving anything: a truncated, deleted or rewritten audit log, or
        # a ledger missing, emptied or behind its anchor in that log, raises a SiteError here
        self.ledger.verify()
        self.cache = ComponentCache(
            self.state_dir / "components",
            max_bytes=cache_max_bytes,
            max_entry_bytes=max_file_bytes,
        )
        self.data_cache = self.state_dir / "data-cache"
        self.replies = self.state_dir / "replies"
        self.device = device
        self._spare_model: tuple[tuple[str, int], UniconModel] | None = None
        self._spare_lock = threading.Lock()
        """The model of the last request served, kept to be reloaded (:meth:`_model_for`)."""

    @property
    def name(self) -> str:
        """The site's name from its manifest."""
        return self.manifest.site

    def epsilon(self) -> float:
        """Privacy spent so far (composition of every DP request) at the policy's delta.

        Fails closed: a ledger deleted, emptied or behind its anchor raises instead of
        reporting 0 (capabilities and replies then carry an error, not a reset budget).
        """
        self.ledger.verify()
        return self.ledger.epsilon(self.policy.delta)

    def _base_config(self) -> dict[str, str]:
        return {
            KEY_SITE: self.name,
            KEY_EPSILON: json.dumps(round(self.epsilon(), 6)),
            KEY_CACHED: json.dumps(self.cache.digests()),
        }

    # ---------------------------------------------------------------- capabilities
    def capabilities(self) -> dict[str, Any]:
        """What the site can train: tasks, modalities, case counts, policy, ε spent."""
        return {
            "site": self.name,
            "tasks": {name: t.kind for name, t in self.manifest.tasks.items()},
            "modalities": list(self.manifest.modalities),
            "counts": self.manifest.counts(),
            "policy": self.policy.model_dump(mode="json"),
            "epsilon": self.epsilon(),
        }

    # ---------------------------------------------------------------- model assembly
    def _assemble(
        self,
        request: StageRequest,
        arrays: Mapping[str, Tensor],
        received_components: list[dict[str, Tensor]] | None = None,
    ) -> UniconModel:
        """Grow the model through the request's stage and load the needed components.

        Components that arrived in full (digest verified) are appended to
        ``received_components`` and *not* cached here: the caller caches them with
        :meth:`_cache` only once the request is served, so a refused request stores nothing.
        """
        state: dict[str, Tensor] = {}
        missing = []
        for component, digest in sorted(request.digests.items()):
            prefix = key_prefix(component)
            received = {k: v for k, v in arrays.items() if k.startswith(prefix)}
            if received:
                actual = tensor_digest(received)
                if actual != digest:
                    raise SiteError(
                        f"component {component} arrived with digest {actual[:12]}… but the "
                        f"request announced {digest[:12]}…; refusing a corrupted transfer"
                    )
                if received_components is not None:
                    received_components.append(received)
            else:
                cached = self.cache.get(digest)
                if cached is None:
                    missing.append(component)
                    continue
                received = cached
            state.update(received)
        if missing:
            raise CacheMiss(missing)
        model = self._model_for(request, state)
        load_state(model, state)
        return model

    def _model_for(self, request: StageRequest, state: Mapping[str, Tensor]) -> UniconModel:
        """A model grown through the request's stage, to load ``state`` into.

        The model of the previous request is reused (not built again, which costs more than
        loading its weights) when it was grown from the same plan through the same stage and
        ``state`` covers every one of its tensors, so nothing of its previous weights
        survives; it is put back in training mode with every parameter trainable and no
        gradient, on the CPU, as a freshly built one. It is taken out of the spare slot
        until :meth:`_keep_model` returns it, so a request that fails never leaves one.
        """
        key = (request.plan.model_dump_json(), request.stage_index)
        with self._spare_lock:  # two requests served at once never share a model
            spare, self._spare_model = self._spare_model, None
        if spare is not None and spare[0] == key and set(spare[1].state_dict()) == set(state):
            model = spare[1].cpu().train()
            for parameter in model.parameters():
                parameter.requires_grad_(True)
                parameter.grad = None
            return model
        return UniconModel.from_plan(request.plan, through_stage=request.stage_index)

    def _keep_model(self, request: StageRequest, model: UniconModel) -> None:
        """Keep ``model`` (just served ``request``) for the next request to reload."""
        self._spare_model = ((request.plan.model_dump_json(), request.stage_index), model)

    def _cache(self, received_components: list[dict[str, Tensor]]) -> None:
        """Cache the components of a served request (evicting least recently used ones)."""
        for component in received_components:
            self.cache.put(component)

    def received_state(
        self, request: StageRequest, arrays: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The received global values of the components the request's stage trains."""
        stage = request.plan.stages[request.stage_index]
        model = self._assemble(request, arrays)
        return {
            k: v.detach().clone() for k, v in select_state(model, stage.trained_components).items()
        }

    def _serves(self, name: str, spec: TaskSpec) -> bool:
        """Whether the site has data for task ``name``: its labels, or (self-supervised
        tasks) just images."""
        return spec.self_supervised or name in self.manifest.tasks

    def _route(self, plan: Plan, stage_index: int) -> ModalitySpec:
        """The stage modality whose images the site has (the first, in plan order)."""
        known = plan.modalities_until(stage_index)
        for name in plan.stage_modalities(stage_index):
            spec = known[name]
            if all(k in self.manifest.modalities for k in spec.input_keys):
                return spec
        raise RequestRefused(
            f"site {self.name} has no images for the modalities of stage "
            f"{plan.stages[stage_index].name!r} ({list(plan.stage_modalities(stage_index))}); "
            f"it has {list(self.manifest.modalities)}"
        )

    # ---------------------------------------------------------------- train
    def _reply_path(self, key: str, suffix: str) -> Path:
        """``<state>/replies/<sha256(key)><suffix>``, proven to stay under the state dir."""
        return path_under(self.replies, hashlib.sha256(key.encode()).hexdigest() + suffix)

    def _load_stored_reply(self, key: str) -> SiteReply | None:
        """The stored reply of ``key``; ``None`` when there is none or it is torn/corrupt.

        A stored reply that cannot be used (bad JSON, wrong fields, oversized or truncated
        safetensors, tensors that do not hash to the recorded digest) is logged and treated
        as absent, so the request is served again instead of failing forever.
        """
        meta = self._reply_path(key, ".json")
        if not meta.exists():
            return None
        try:
            if meta.stat().st_size > _MAX_REPLY_JSON_BYTES:
                raise ValueError(f"{meta.stat().st_size} bytes is over {_MAX_REPLY_JSON_BYTES}")
            stored = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or stored.get("key") != key:
                raise ValueError("not a stored reply of this request")
            metrics = stored.get("metrics")
            if not isinstance(metrics, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in metrics.items()
            ):
                raise ValueError("'metrics' is not an object of numbers")
            tensors = load_safetensors(
                self._reply_path(key, ".safetensors"), max_bytes=self.max_file_bytes
            )
            if tensor_digest(tensors) != stored.get("digest"):
                raise ValueError("its tensors do not match the recorded digest")
        except Exception as e:  # OSError, ValueError, RecursionError, safetensors' own errors
            logger.warning(
                "site %s: stored reply %s of %s is unusable (%s: %s); serving the request again",
                self.name,
                meta,
                key,
                type(e).__name__,
                e,
            )
            return None
        return SiteReply(tensors, {k: float(v) for k, v in metrics.items()}, self._base_config())

    def _store_reply(self, key: str, reply: SiteReply) -> None:
        """Store a reply atomically: the tensors first, then the JSON naming their digest.

        Not fsynced (four fsyncs were a fifth of a tiny model's steady-state round): a
        reply lost or torn by a power loss is detected by :meth:`_load_stored_reply` and
        the request is served again; its privacy spending is already in the (fsynced)
        ledger, and a new DP release is counted again (:meth:`_ledger_key`).
        """
        self.replies.mkdir(mode=0o700, parents=True, exist_ok=True)
        arrays = {k: v.detach().cpu().contiguous() for k, v in reply.arrays.items()}
        _write_reply_file(
            self._reply_path(key, ".safetensors"), lambda tmp: save_file(arrays, str(tmp))
        )
        meta = {"key": key, "digest": tensor_digest(arrays), "metrics": reply.metrics}
        _write_reply_file(self._reply_path(key, ".json"), json.dumps(meta))

    def _exclusive(self) -> contextlib.AbstractContextManager[int]:
        """One train request at a time per state directory (budget check and record together)."""
        return file_lock(self.state_dir / "train.lock")

    def train(self, request: StageRequest, arrays: Mapping[str, Tensor]) -> SiteReply:
        """Serve a train request: local training (or analytic statistics) of one round.

        Requests are served one at a time per state directory, so the privacy budget check
        and the spending record cannot interleave with another request's.

        Raises
        ------
        RequestRefused
            When the policy forbids the stage, the privacy budget would be exceeded, the site
            has no data for it, or components are missing from the cache.
        """
        started = time.perf_counter()
        with timing.recording() as phases, self._exclusive():
            reply = self._train(request, arrays)
            reply = SiteReply(
                reply.arrays, {**reply.metrics, **timing.metrics(phases)}, reply.config
            )
        logger.info(
            "site %s: served train stage %s round %d: %d case(s), %.1f s, ε so far %s",
            self.name,
            request.stage,
            request.server_round,
            int(reply.metrics.get(KEY_NUM_EXAMPLES, 0)),
            time.perf_counter() - started,
            reply.config.get(KEY_EPSILON, "-"),
        )
        return reply

    def _train(self, request: StageRequest, arrays: Mapping[str, Tensor]) -> SiteReply:
        plan, index = request.plan, request.stage_index
        stage = plan.stages[index]
        check_name(request.run, "run of the train request")  # it names a folder (regularisers)
        model_digest = hashlib.sha256(
            json.dumps(request.digests, sort_keys=True).encode()
        ).hexdigest()
        key = f"{request.run}/{stage.name}/{request.server_round}/{model_digest}"
        with timing.phase("persist"):
            stored = self._load_stored_reply(key)
        if stored is not None:
            logger.info("site %s: replaying the stored reply of %s", self.name, key)
            self.audit.append(
                "train-replay", {"key": key, "stage": stage.name, "round": request.server_round}
            )
            return stored
        tasks = {
            name: spec
            for name, spec in plan.tasks_until(index).items()
            if name in stage.objective_tasks and self._serves(name, spec)
        }
        try:
            modality = self._route(plan, index)
            enforce(
                self.policy,
                stage,
                stage_tasks=list(tasks),
                stage_modalities=[modality.name],
                data=plan.data,
            )
            if not tasks:
                raise RequestRefused(
                    f"site {self.name} has no labels for the objectives of stage "
                    f"{stage.name!r} ({list(stage.objective_tasks)})"
                )
        except RequestRefused as e:
            self.audit.append("refused", {"stage": stage.name, "reason": str(e)})
            raise
        received: list[dict[str, Tensor]] = []
        with timing.phase("model"):
            model = self._assemble(request, arrays, received)
        dataset = self._dataset(
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
        if stage.is_analytic:
            with timing.phase("train"):
                reply = self._analytic_statistics(model, dataset, tasks, modality)
            spent: dict[str, float] = {}
        else:
            reply, spent = self._local_training(request, key, model, dataset, tasks)
        with timing.phase("persist"):
            self._store_reply(key, reply)
            self._cache(received)  # only now: a refused request leaves nothing in the cache
            self.audit.append(
                "train",
                {
                    "run": request.run,
                    "stage": stage.name,
                    "round": request.server_round,
                    "model": model_digest,
                    "components": sorted(stage.trained_components),
                    "num_examples": reply.metrics.get(KEY_NUM_EXAMPLES, 0),
                    "epsilon": self.epsilon(),
                    **spent,
                    "metrics": {k: v for k, v in reply.metrics.items() if math.isfinite(v)},
                },
            )
        with timing.phase("dp"):
            config = self._base_config()
        if stage.privacy.mode != "local":  # Opacus wrapped a DP model: never reused
            self._keep_model(request, model)
        return SiteReply(reply.arrays, reply.metrics, config)

    def _dataset(
        self, *, split: str, modality: ModalitySpec, tasks: Mapping[str, TaskSpec], plan: Plan
    ) -> CaseDataset:
        """:func:`client.data.build_dataset` on the site's cache, timed as phase ``data``.

        The preprocessing cache's misses (entries written by this call) and hits (cases
        loaded without one) are counted as ``count/data_cache_misses`` and ``..._hits``.
        """
        with timing.phase("data"):
            before = self._cache_entries()
            dataset = build_dataset(
                self.manifest,
                split=split,
                modality=modality,
                tasks=tasks,
                data=plan.data,
                cache_dir=self.data_cache,
            )
            misses = max(self._cache_entries() - before, 0)
        timing.count("data_cache_misses", misses)
        timing.count("data_cache_hits", max(len(dataset) + len(dataset.skipped) - misses, 0))
        return dataset

    def _cache_entries(self) -> int:
        """Number of preprocessed cases in the site's data cache."""
        try:
            return sum(1 for p in os.scandir(self.data_cache) if p.name.endswith(".npz"))
        except OSError:
            return 0

    def _local_training(
        self,
        request: StageRequest,
        key: str,
        model: UniconModel,
        dataset: CaseDataset,
        tasks: Mapping[str, Any],
    ) -> tuple[SiteReply, dict[str, float]]:
        plan, index = request.plan, request.stage_index
        stage = plan.stages[index]
        if len(dataset) == 0:
            reason = f"site {self.name} has no usable training cases for stage {stage.name!r}"
            self.audit.append("refused", {"stage": stage.name, "reason": reason})
            raise RequestRefused(reason)
        privacy = None
        spent: dict[str, float] = {}
        batch_size = min(stage.batch_size, len(dataset))
        if stage.privacy.mode == "local":
            sample_rate, steps = steps_for(len(dataset), batch_size, stage.local_epochs)
            try:
                with timing.phase("dp"):
                    noise = stage_noise_multiplier(
                        target_epsilon=stage.privacy.target_epsilon,
                        delta=stage.privacy.delta,
                        sample_rate=sample_rate,
                        total_steps=steps * stage.rounds,
                    )
                    self.ledger.check_budget(
                        self.policy, noise_multiplier=noise, sample_rate=sample_rate, steps=steps
                    )
            except RequestRefused as e:
                self.audit.append("refused", {"stage": stage.name, "reason": str(e)})
                raise
            privacy = DPSettings(noise, stage.privacy.max_grad_norm)
            spent = {"noise_multiplier": noise, "sample_rate": sample_rate, "steps": steps}
        started = time.perf_counter()
        with timing.phase("train"):
            set_trainable(model, stage.trained_components)
            regularisers = build_regularisers(
                stage,
                model,
                plan=plan,
                stage_index=index,
                dataset=dataset,
                state_dir=path_under(
                    self.state_dir, "regularisers", check_name(request.run, "run")
                ),
            )
            seed = self._training_seed(request, private=privacy is not None)
            result = train(
                model,
                stage,
                dataset,
                tasks=tasks,
                regularisers=regularisers,
                privacy=privacy,
                device=self.device,
                seed=seed,
            )
        train_s = time.perf_counter() - started
        if privacy is not None:
            with timing.phase("dp"):
                self.ledger.record(
                    self._ledger_key(key),
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

    def _training_seed(self, request: StageRequest, *, private: bool) -> int | None:
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
        derived from the run, stage, round and site: runs on different engines (Flower or
        in-process, any thread count) then shuffle alike and reproduce each other.
        """
        if private:
            return None
        seed_key = f"{request.run}/{request.stage}/{request.server_round}/{self.name}"
        return int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:4], "little")

    def _ledger_key(self, key: str) -> str:
        """``key``, or ``key#retrain-N`` when the ledger already holds ``key``.

        That happens only when the stored reply of a request was lost or torn after its
        spending was recorded: the new training draws fresh noise, so it is a new release
        and must be counted again (the ledger ignores a key it already holds).
        """
        candidate, n = key, 1
        while self.ledger.has(candidate):
            candidate, n = f"{key}#retrain-{n}", n + 1
        if candidate != key:
            logger.warning(
                "site %s: %s was already spent once; recording this new release as %s",
                self.name,
                key,
                candidate,
            )
        return candidate

    def _analytic_statistics(
        self,
        model: UniconModel,
        dataset: CaseDataset,
        tasks: Mapping[str, Any],
        modality: ModalitySpec,
    ) -> SiteReply:
        """Sufficient statistics of every analytic head of the stage on frozen features."""
        model.eval()
        arrays: dict[str, Tensor] = {}
        count = 0
        with torch.no_grad():
            images = torch.stack([s["image"] for s in dataset.samples]) if len(dataset) else None
            features = (
                model.pooled_features(images, modality=modality.name)
                if images is not None
                else None
            )
        for name, spec in tasks.items():
            labels = [int(s[f"{name}:label"]) for s in dataset.samples]
            keep = [i for i, y in enumerate(labels) if y >= 0]
            if features is None or not keep:
                continue
            stats = RidgeStatistics.from_data(
                features[keep].double().numpy(),
                one_hot_targets([labels[i] for i in keep], spec.num_outputs),
            )
            count = max(count, len(keep))
            for stat, value in stats.to_arrays().items():
                arrays[f"{name}/{stat}"] = torch.from_numpy(value)
        return SiteReply(arrays, {KEY_NUM_EXAMPLES: float(count)})

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, request: StageRequest, arrays: Mapping[str, Tensor]) -> SiteReply:
        """Metrics of every task learned through the request's stage, per modality route.

        The site's policy applies as for training: tasks outside ``allowed_tasks`` and
        modality routes outside ``allowed_modalities`` (by name or by any input image) are
        not evaluated. Only the ``val`` and ``test`` splits are served. A route whose split
        holds fewer than ``min_evaluation_cases`` cases, or a task with fewer labelled cases
        than that, yields no metrics (logged and audited as skipped): a metric over one case
        gives its label away. Routes skipped this way are simply absent from the reply.

        Raises
        ------
        RequestRefused
            (audited) For a split other than ``val``/``test``, or when the policy leaves no
            task or no modality route that the site could otherwise evaluate.
        CacheMiss
            Components referenced by digest are not in the cache.
        """
        with timing.recording() as phases:
            reply = self._evaluate(request, arrays)
            return SiteReply(
                reply.arrays, {**reply.metrics, **timing.metrics(phases)}, reply.config
            )

    def _evaluate(self, request: StageRequest, arrays: Mapping[str, Tensor]) -> SiteReply:
        started = time.perf_counter()
        plan, index = request.plan, request.stage_index
        policy = self.policy
        # a self-supervised task is scored only on ``val`` by its own stage's validation
        # (it drives keep-best and patience); it never enters R on ``test``
        objectives = plan.stages[index].objective_tasks if request.split == "val" else ()
        learned = {
            n: t
            for n, t in plan.tasks_until(index).items()
            if self._serves(n, t) and (not t.self_supervised or n in objectives)
        }
        tasks = {
            n: t
            for n, t in learned.items()
            if policy.allowed_tasks is None or n in policy.allowed_tasks
        }
        routes = [
            m
            for m in plan.modalities_until(index).values()
            if all(k in self.manifest.modalities for k in m.input_keys)
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
        try:
            enforce_data(policy, plan.data, stage=request.stage)
            if request.split not in EVALUATION_SPLITS:
                raise RequestRefused(
                    f"site {self.name} evaluates only the {list(EVALUATION_SPLITS)} splits, "
                    f"not {request.split!r}: metrics on training cases are not released"
                )
            if learned and not tasks:
                raise RequestRefused(
                    f"site {self.name}'s policy allows none of the tasks to evaluate "
                    f"({sorted(learned)}; allowed_tasks = {list(policy.allowed_tasks or ())})"
                )
            if routes and not allowed_routes:
                raise RequestRefused(
                    f"site {self.name}'s policy allows none of the modality routes to evaluate "
                    f"({[m.name for m in routes]}; allowed_modalities = "
                    f"{list(policy.allowed_modalities or ())})"
                )
        except RequestRefused as e:
            self.audit.append(
                "refused", {"stage": request.stage, "split": request.split, "reason": str(e)}
            )
            raise
        received: list[dict[str, Tensor]] = []
        with timing.phase("model"):
            model = self._assemble(request, arrays, received)
        minimum = self.min_evaluation_cases
        metrics: dict[str, float] = {}
        total = 0
        for modality in allowed_routes if tasks else []:
            dataset = self._dataset(split=request.split, modality=modality, tasks=tasks, plan=plan)
            if len(dataset) == 0:
                continue
            if len(dataset) < minimum:
                skipped[f"@{modality.name}"] = (
                    f"{len(dataset)} {request.split} case(s), fewer than the minimum {minimum}"
                )
                continue
            total = max(total, len(dataset))
            with timing.phase("eval"):
                values = evaluate(model, dataset, tasks=tasks, device=self.device)
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
        for what, reason in skipped.items():
            logger.info("site %s: no evaluation of %s: %s", self.name, what, reason)
        with timing.phase("persist"):
            self._cache(received)
            self.audit.append(
                "evaluate",
                {
                    "run": request.run,
                    "stage": request.stage,
                    "split": request.split,
                    "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
                    "skipped": skipped,
                },
            )
        with timing.phase("dp"):
            reply = SiteReply({}, metrics, self._base_config())
        self._keep_model(request, model)
        logger.info(
            "site %s: served evaluate stage %s round %d (%s): %d case(s), %.1f s, ε so far %s",
            self.name,
            request.stage,
            request.server_round,
            request.split,
            total,
            time.perf_counter() - started,
            reply.config.get(KEY_EPSILON, "-"),
        )
        return reply
