"""A hospital site serving the coordinator's requests. No Flower here.

:class:`Site` owns the site's manifest, policy and state directory (audit log, privacy
ledger, component cache, preprocessed-data cache, stored replies) and answers the three
requests of :mod:`unicon_model.protocol`: capabilities, train and evaluate. The ClientApp is
a thin adapter around it.

A train request is answered at most once per (run, stage, round, model): a replay after a
coordinator crash returns the stored reply, so nothing new is released and no privacy is
spent twice. Privacy spending is recorded in the ledger *before* the reply is stored and
returned, so a crash can never release an update whose cost was not recorded.

This module holds the site's state; the requests are served by :mod:`client.site_training`
and :mod:`client.site_evaluation`, with the model assembled and reused by
:mod:`client.site_model` and the replies stored by :mod:`client.site_replies`. The names
other modules use (:class:`CacheMiss`, :class:`SiteReply`) are importable from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from client import timing
from client.audit import AuditLog
from client.component_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILE_BYTES, ComponentCache
from client.data import CaseDataset, build_dataset
from client.dp import stage_noise_multiplier
from client.ledger import PrivacyLedger
from client.manifest import SiteManifest, load_manifest
from client.policy import SitePolicy, default_policy, load_policy
from client.site_evaluation import EVALUATION_SPLITS, evaluate_request
from client.site_model import CacheMiss, ModelStore, SpareModel
from client.site_replies import ReplyStore, SiteReply
from client.site_training import serve_train
from client.trainer import train
from unicon_model.components import select_state
from unicon_model.durable import file_lock
from unicon_model.model import UniconModel
from unicon_model.protocol import KEY_CACHED, KEY_EPSILON, KEY_NUM_EXAMPLES, KEY_SITE, StageRequest
from unicon_model.schema import ModalitySpec, Plan, TaskSpec

__all__ = [
    "DEFAULT_MAX_BYTES",
    "EVALUATION_SPLITS",
    "MIN_EVALUATION_CASES",
    "CacheMiss",
    "Site",
    "SiteReply",
]

logger = logging.getLogger(__name__)

MIN_EVALUATION_CASES = 2
"""Default smallest split a route is evaluated on: metrics of fewer cases are withheld.

A metric over one case gives that case's label (or the model's hit on it) away. Two is the
floor the shipped synthetic sites allow (their test splits hold 2-4 cases); a hospital
should raise it with ``Site(min_evaluation_cases=...)``.
"""


def _restrict(path: Path, mode: int) -> None:
    """Set ``path``'s permission bits to ``mode`` where the site owns it (logged otherwise)."""
    try:
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
    except OSError as e:
        logger.warning("cannot set mode %o on %s: %s", mode, path, e)


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
        self.models = ModelStore(self.cache)
        """Assembles the model of each request and keeps the last one to reload it."""
        self.data_cache = self.state_dir / "data-cache"
        self.replies = self.state_dir / "replies"
        self.stored_replies = ReplyStore(
            self.replies, max_file_bytes=max_file_bytes, site=self.name
        )
        """The stored replies of train requests, replayed instead of served again."""
        self.device = device

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
    @property
    def _spare_model(self) -> SpareModel | None:
        """The model of the last request served, kept to be reloaded (:meth:`_model_for`)."""
        return self.models.spare

    @_spare_model.setter
    def _spare_model(self, spare: SpareModel | None) -> None:
        self.models.spare = spare

    def _model_for(self, request: StageRequest, state: Mapping[str, Tensor]) -> UniconModel:
        """A model grown through the request's stage, the previous one reused when it can be.

        See :meth:`client.site_model.ModelStore.model_for`.
        """
        return self.models.model_for(request, state)

    def received_state(
        self, request: StageRequest, arrays: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The received global values of the components the request's stage trains."""
        stage = request.plan.stages[request.stage_index]
        model = self.models.assemble(request, arrays)
        return {
            k: v.detach().clone() for k, v in select_state(model, stage.trained_components).items()
        }

    def _serves(self, name: str, spec: TaskSpec) -> bool:
        """Whether the site has data for task ``name``: its labels, or (self-supervised
        tasks) just images; a label extension reads the labels of the task it extends."""
        return spec.self_supervised or spec.label_source in self.manifest.tasks

    # ---------------------------------------------------------------- stored replies
    def _reply_path(self, key: str, suffix: str) -> Path:
        """``<state>/replies/<sha256(key)><suffix>``, proven to stay under the state dir."""
        return self.stored_replies.path(key, suffix)

    def _load_stored_reply(self, key: str) -> SiteReply | None:
        """The stored reply of ``key`` with the site's config; ``None`` when unusable.

        See :meth:`client.site_replies.ReplyStore.load`.
        """
        stored = self.stored_replies.load(key)
        if stored is None:
            return None
        return SiteReply(stored.arrays, stored.metrics, self._base_config())

    def _store_reply(self, key: str, reply: SiteReply) -> None:
        """Store a reply atomically (see :meth:`client.site_replies.ReplyStore.store`)."""
        self.stored_replies.store(key, reply)

    # ---------------------------------------------------------------- train
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
        # ``train`` and ``stage_noise_multiplier`` are looked up in this module at every
        # request, so that replacing them here (as tests do) replaces them for the site
        return serve_train(
            self, request, arrays, fit=train, noise_multiplier=stage_noise_multiplier
        )

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
        reply, total = evaluate_request(self, request, arrays)
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
