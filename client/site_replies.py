"""A site's replies, and the stored replies of train requests, replayed after a crash.

A train request is answered at most once per (run, stage, round, model): its reply is
stored under ``<state>/replies`` (:class:`ReplyStore`) and a replay of the request returns
it, so nothing new is released and no privacy is spent twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from client.component_cache import load_safetensors
from unicon_model.checkpoint import tensor_digest
from unicon_model.durable import Content, atomic_write
from unicon_model.names import path_under

logger = logging.getLogger(__name__)

MAX_REPLY_JSON_BYTES = 16 * 1024**2
"""Bound on a stored reply's JSON (metrics only: a few kB in practice)."""


@dataclass(frozen=True)
class SiteReply:
    """A site's answer: tensors, metrics and config values (see the protocol module)."""

    arrays: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)


def _write_reply_file(path: Path, content: Content) -> None:
    """Write a stored reply's file atomically, without fsync (see :meth:`ReplyStore.store`).

    A process crash leaves the old file or the new one; a power loss may leave neither, or a
    torn one, which is detected when the reply is loaded.
    """
    atomic_write(
        path, content, fsync=False, fsync_dir=False, prefix=f".tmp-{path.name}-", suffix=""
    )


def _read_meta(meta: Path, key: str) -> dict[str, Any]:
    """The JSON of a stored reply of ``key``; ValueError when it is not one."""
    if meta.stat().st_size > MAX_REPLY_JSON_BYTES:
        raise ValueError(f"{meta.stat().st_size} bytes is over {MAX_REPLY_JSON_BYTES}")
    stored = json.loads(meta.read_text(encoding="utf-8"))
    if not isinstance(stored, dict) or stored.get("key") != key:
        raise ValueError("not a stored reply of this request")
    metrics = stored.get("metrics")
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in metrics.items()
    ):
        raise ValueError("'metrics' is not an object of numbers")
    return stored


class ReplyStore:
    """The stored replies of one site, keyed by request.

    Parameters
    ----------
    directory
        The folder of the stored replies (``<state>/replies``; created on the first store).
    max_file_bytes
        Largest safetensors file read back; bigger files are refused before decoding.
    site
        The site's name, for log messages.
    """

    def __init__(self, directory: Path, *, max_file_bytes: int, site: str) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self.site = site

    def path(self, key: str, suffix: str) -> Path:
        """``<replies>/<sha256(key)><suffix>``, proven to stay under the replies folder."""
        return path_under(self.directory, hashlib.sha256(key.encode()).hexdigest() + suffix)

    def load(self, key: str) -> SiteReply | None:
        """The stored reply of ``key`` (no config); ``None`` when absent, torn or corrupt.

        A stored reply that cannot be used (bad JSON, wrong fields, oversized or truncated
        safetensors, tensors that do not hash to the recorded digest) is logged and treated
        as absent, so the request is served again instead of failing forever.
        """
        meta = self.path(key, ".json")
        if not meta.exists():
            return None
        try:
            stored = _read_meta(meta, key)
            tensors = load_safetensors(
                self.path(key, ".safetensors"), max_bytes=self.max_file_bytes
            )
            if tensor_digest(tensors) != stored.get("digest"):
                raise ValueError("its tensors do not match the recorded digest")
        except Exception as e:  # OSError, ValueError, RecursionError, safetensors' own errors
            logger.warning(
                "site %s: stored reply %s of %s is unusable (%s: %s); serving the request again",
                self.site,
                meta,
                key,
                type(e).__name__,
                e,
            )
            return None
        return SiteReply(tensors, {k: float(v) for k, v in stored["metrics"].items()})

    def store(self, key: str, reply: SiteReply) -> None:
        """Store a reply atomically: the tensors first, then the JSON naming their digest.

        Not fsynced (four fsyncs were a fifth of a tiny model's steady-state round): a
        reply lost or torn by a power loss is detected by :meth:`load` and the request is
        served again; its privacy spending is already in the (fsynced) ledger, and a new DP
        release is counted again (:func:`client.site_training.ledger_key`).
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        arrays = {k: v.detach().cpu().contiguous() for k, v in reply.arrays.items()}
        _write_reply_file(self.path(key, ".safetensors"), lambda tmp: save_file(arrays, str(tmp)))
        meta = {"key": key, "digest": tensor_digest(arrays), "metrics": reply.metrics}
        _write_reply_file(self.path(key, ".json"), json.dumps(meta))
