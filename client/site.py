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
import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from client.audit import AuditLog
from client.component_cache import ComponentCache
from client.data import CaseDataset, build_dataset
from client.errors import RequestRefused, SiteError
from client.manifest import SiteManifest, load_manifest
from client.policy import SitePolicy, default_policy, enforce, load_policy
from client.privacy import PrivacyLedger, stage_noise_multiplier, steps_for
from client.regularisation import build_regularisers
from client.trainer import DPSettings, evaluate, train
from unicon_model.analytic import RidgeStatistics, one_hot_targets
from unicon_model.checkpoint import tensor_digest
from unicon_model.components import key_prefix, load_state, select_state, set_trainable
from unicon_model.model import UniconModel
from unicon_model.protocol import (
    KEY_CACHED,
    KEY_EPSILON,
    KEY_NUM_EXAMPLES,
    KEY_SITE,
    StageRequest,
    metric_key,
)
from unicon_model.schema import ModalitySpec, Plan

logger = logging.getLogger(__name__)


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
    """

    def __init__(
        self,
        *,
        manifest_path: str | Path,
        state_dir: str | Path,
        policy_path: str | Path | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.manifest: SiteManifest = load_manifest(manifest_path)
        self.policy: SitePolicy = load_policy(policy_path) if policy_path else default_policy()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.ledger = PrivacyLedger(self.state_dir / "privacy" / "ledger.json")
        self.cache = ComponentCache(self.state_dir / "components")
        self.data_cache = self.state_dir / "data-cache"
        self.replies = self.state_dir / "replies"
        self.device = device

    @property
    def name(self) -> str:
        """The site's name from its manifest."""
        return self.manifest.site

    def epsilon(self) -> float:
        """Privacy spent so far (composition of every DP request) at the policy's delta."""
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
    def _assemble(self, request: StageRequest, arrays: Mapping[str, Tensor]) -> UniconModel:
        """Grow the model through the request's stage and load the needed components."""
        model = UniconModel.from_plan(request.plan, through_stage=request.stage_index)
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
                self.cache.put(received)
            else:
                cached = self.cache.get(digest)
                if cached is None:
                    missing.append(component)
                    continue
                received = cached
            state.update(received)
        if missing:
            raise CacheMiss(missing)
        load_state(model, state)
        return model

    def received_state(
        self, request: StageRequest, arrays: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The received global values of the components the request's stage trains."""
        stage = request.plan.stages[request.stage_index]
        model = self._assemble(request, arrays)
        return {
            k: v.detach().clone() for k, v in select_state(model, stage.trained_components).items()
        }

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
    def _reply_path(self, key: str) -> Path:
        return self.replies / hashlib.sha256(key.encode()).hexdigest()

    def _load_stored_reply(self, key: str) -> SiteReply | None:
        path = self._reply_path(key)
        meta = path.with_suffix(".json")
        if not meta.exists():
            return None
        stored = json.loads(meta.read_text())
        tensors = load_file(path.with_suffix(".safetensors"))
        if tensor_digest(tensors) != stored["digest"]:
            logger.warning("stored reply for %s is corrupt; training again", key)
            return None
        return SiteReply(tensors, stored["metrics"], self._base_config())

    def _store_reply(self, key: str, reply: SiteReply) -> None:
        path = self._reply_path(key)
        self.replies.mkdir(parents=True, exist_ok=True)
        save_file(reply.arrays, str(path.with_suffix(".safetensors")))
        meta = {"key": key, "digest": tensor_digest(reply.arrays), "metrics": reply.metrics}
        path.with_suffix(".json").write_text(json.dumps(meta))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One train request at a time per state directory (budget check and record together)."""
        with open(self.state_dir / "train.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
        with self._exclusive():
            return self._train(request, arrays)

    def _train(self, request: StageRequest, arrays: Mapping[str, Tensor]) -> SiteReply:
        plan, index = request.plan, request.stage_index
        stage = plan.stages[index]
        model_digest = hashlib.sha256(
            json.dumps(request.digests, sort_keys=True).encode()
        ).hexdigest()
        key = f"{request.run}/{stage.name}/{request.server_round}/{model_digest}"
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
            if name in stage.objective_tasks and name in self.manifest.tasks
        }
        modality = self._route(plan, index)
        try:
            enforce(self.policy, stage, stage_tasks=list(tasks), stage_modalities=[modality.name])
            if not tasks:
                raise RequestRefused(
                    f"site {self.name} has no labels for the objectives of stage "
                    f"{stage.name!r} ({list(stage.objective_tasks)})"
                )
        except RequestRefused as e:
            self.audit.append("refused", {"stage": stage.name, "reason": str(e)})
            raise
        model = self._assemble(request, arrays)
        dataset = build_dataset(
            self.manifest,
            split="train",
            modality=modality,
            tasks=plan.tasks_until(index),
            data=plan.data,
            cache_dir=self.data_cache,
        )
        if stage.is_analytic:
            reply = self._analytic_statistics(model, dataset, tasks, modality)
            spent: dict[str, float] = {}
        else:
            reply, spent = self._local_training(request, key, model, dataset, tasks)
        self._store_reply(key, reply)
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
        return SiteReply(reply.arrays, reply.metrics, self._base_config())

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
            raise RequestRefused(
                f"site {self.name} has no usable training cases for stage {stage.name!r}"
            )
        privacy = None
        spent: dict[str, float] = {}
        batch_size = min(stage.batch_size, len(dataset))
        if stage.privacy.mode == "local":
            sample_rate, steps = steps_for(len(dataset), batch_size, stage.local_epochs)
            noise = stage_noise_multiplier(
                target_epsilon=stage.privacy.target_epsilon,
                delta=stage.privacy.delta,
                sample_rate=sample_rate,
                total_steps=steps * stage.rounds,
            )
            try:
                self.ledger.check_budget(
                    self.policy, noise_multiplier=noise, sample_rate=sample_rate, steps=steps
                )
            except RequestRefused as e:
                self.audit.append("refused", {"stage": stage.name, "reason": str(e)})
                raise
            privacy = DPSettings(noise, stage.privacy.max_grad_norm)
            spent = {"noise_multiplier": noise, "sample_rate": sample_rate, "steps": steps}
        set_trainable(model, stage.trained_components)
        regularisers = build_regularisers(
            stage,
            model,
            plan=plan,
            stage_index=index,
            dataset=dataset,
            state_dir=self.state_dir / "regularisers" / request.run,
        )
        # the seed names the run, stage, round and site but not the model's bytes, so runs on
        # different engines (thread counts) shuffle alike even if floats differ in the last bit
        seed_key = f"{request.run}/{stage.name}/{request.server_round}/{self.name}"
        seed = int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:4], "little")
        started = time.perf_counter()
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
        if privacy is not None:
            self.ledger.record(
                key,
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
            "train_s": time.perf_counter() - started,
            **result.metrics,
        }
        return SiteReply(result.update, metrics), spent

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
        """Metrics of every task learned through the request's stage, per modality route."""
        plan, index = request.plan, request.stage_index
        model = self._assemble(request, arrays)
        tasks = {n: t for n, t in plan.tasks_until(index).items() if n in self.manifest.tasks}
        metrics: dict[str, float] = {}
        total = 0
        for modality in plan.modalities_until(index).values():
            if not all(k in self.manifest.modalities for k in modality.input_keys):
                continue
            dataset = build_dataset(
                self.manifest,
                split=request.split,
                modality=modality,
                tasks=tasks,
                data=plan.data,
                cache_dir=self.data_cache,
            )
            if len(dataset) == 0:
                continue
            total = max(total, len(dataset))
            for name, value in evaluate(model, dataset, tasks=tasks, device=self.device).items():
                task, _, metric = name.partition("/")
                metrics[metric_key(task, modality.name, metric)] = value
        metrics[KEY_NUM_EXAMPLES] = float(total)
        self.audit.append(
            "evaluate",
            {
                "run": request.run,
                "stage": request.stage,
                "split": request.split,
                "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
            },
        )
        return SiteReply({}, metrics, self._base_config())
