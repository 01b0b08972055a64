"""The Flower ClientApp of a hospital site: a thin adapter around :class:`client.site.Site`.

Each handler decodes the message (see :mod:`unicon_model.protocol`), calls the site, and
encodes the reply. Every failure the site raises on purpose becomes an error reply with a
code and the site's explanation; the daemon never crashes on a bad request.

Node config (``flower-supernode --node-config``): ``manifest`` (path of the site manifest),
``state-dir`` (the site's state directory), optionally ``policy`` (the site policy file)
and ``max-message-mb`` (the most array bytes a request may carry; see :mod:`unicon_model.wire`:
every array is checked against it and against the request's plan before it is decoded).
In simulation, where node config holds only ``partition-id``, the run config's ``site-dirs``
(JSON list of site folders, each with a manifest) and ``state-root`` select them; the state
directory is ``<state-root>/<site name from the manifest>``, keyed by the site, not the folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from client import secure_aggregation, timing
from client.errors import RequestRefused, SiteError
from client.site import CacheMiss, Site, SiteReply
from client.site_folder import manifest_in, site_name, site_state_dir
from unicon_model import protocol, wire
from unicon_model.errors import UniconModelError

logger = logging.getLogger(__name__)


def _log_to_stderr() -> None:
    """Show the site's own log lines (one per request served) when ``UNICON_LOG_LEVEL`` is set.

    ``unicon site run`` sets it to INFO for the SuperNode it starts; nothing else in the
    ClientApp's process configures the ``client`` logger.
    """
    level = os.environ.get("UNICON_LOG_LEVEL", "").upper()
    root = logging.getLogger("client")
    if level in logging.getLevelNamesMapping() and not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)


_log_to_stderr()

app = ClientApp()
_SITES: dict[tuple[str, str, str], Site] = {}


def site_paths(context: Context) -> tuple[Path, Path, Path | None]:
    """Manifest, state directory and policy of this node (see the module docstring)."""
    node = context.node_config
    if "manifest" in node:
        policy = node.get("policy")
        state = node.get("state-dir") or Path(str(node["manifest"])).parent / "state"
        return Path(str(node["manifest"])), Path(str(state)), Path(str(policy)) if policy else None
    run = context.run_config
    if "partition-id" in node and "site-dirs" in run:
        site_dirs = json.loads(str(run["site-dirs"]))
        folder = Path(site_dirs[int(node["partition-id"])])
        root = Path(str(run.get("state-root") or folder.parent / "state"))
        policy_file = folder / "policy.toml"
        return (
            manifest_in(folder),
            site_state_dir(root, site_name(folder)),  # keyed by the site, not the folder
            policy_file if policy_file.exists() else None,
        )
    raise SiteError(
        "node config needs 'manifest' and 'state-dir' (flower-supernode --node-config "
        '\'manifest="/data/manifest.yaml" state-dir="/var/lib/unicon"\')'
    )


def get_site(context: Context) -> Site:
    """The :class:`Site` of this node, created once per process."""
    manifest, state, policy = site_paths(context)
    key = (str(manifest), str(state), str(policy))
    if key not in _SITES:
        _SITES[key] = Site(manifest_path=manifest, state_dir=state, policy_path=policy)
    return _SITES[key]


def _encode(reply: SiteReply, phases: timing.Recording | None = None) -> RecordDict:
    """The reply's records; with ``phases``, its metrics carry where the site's time went.

    The phases are the whole request's (``time/<phase>_s``, encoding included), and
    ``time/other_s`` is the rest of the time the site spent serving it (policy checks, the
    train lock, logging), so a site's phases add up to its serving time.
    """
    with timing.phase("encode"):
        arrays = ArrayRecord(reply.arrays)
        config = ConfigRecord(dict(reply.config))
    metrics: dict[str, int | float | list[int] | list[float]] = dict(reply.metrics)
    if phases is not None:
        metrics.update(timing.metrics(phases))
        served = time.perf_counter() - phases.started
        metrics[f"{timing.TIME_PREFIX}other_s"] = max(served - sum(phases.seconds.values()), 0.0)
    return RecordDict(
        {
            protocol.ARRAYS: arrays,
            protocol.METRICS: MetricRecord(metrics),
            protocol.CONFIG: config,
        }
    )


def _serve(
    message: Message, context: Context, handler: Callable[[Site, Message], SiteReply]
) -> Message:
    try:
        # before anything decodes an array: each one's declared size and its bytes agree,
        # and the whole message is within the site's fixed limit (SecAgg+ messages too)
        limit = wire.limit_from_config(context.node_config, source="node config")
        for name, record in message.content.array_records.items():
            wire.check_arrays(record, max_bytes=limit, what=f"request record {name!r}")
        if message.metadata.message_type == "train" and secure_aggregation.is_secure(message):
            return secure_aggregation.serve(message, context, get_site)
        site = get_site(context)
        if message.metadata.message_type == "query":
            return Message(_encode(handler(site, message)), reply_to=message)
        with timing.recording() as phases:
            return Message(_encode(handler(site, message), phases), reply_to=message)
    except CacheMiss as e:
        code, reason = protocol.ERROR_CACHE_MISS, json.dumps(e.components)
    except RequestRefused as e:
        code, reason = protocol.ERROR_REFUSED, str(e)
    except protocol.ProtocolError as e:
        code, reason = protocol.ERROR_INVALID, str(e)
    except (SiteError, UniconModelError, OSError, ValueError, KeyError, TypeError) as e:
        code, reason = protocol.ERROR_SITE, f"{type(e).__name__}: {e}"
    logger.warning("request %s refused or failed: %s", message.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=message)


def _request(message: Message, context: Context) -> tuple[protocol.StageRequest, dict[str, Tensor]]:
    """Decode a stage request; its arrays only within the bound of its plan's model."""
    with timing.phase("decode"):
        config = message.content.config_records.get(protocol.CONFIG, ConfigRecord())
        request = protocol.StageRequest.from_config(dict(config))
        arrays = message.content.array_records.get(protocol.ARRAYS, ArrayRecord())
        bound = wire.message_bound(
            request.plan, wire.limit_from_config(context.node_config, source="node config")
        )
        return request, wire.decode_arrays(arrays, max_bytes=bound, what="request arrays")


@app.query()
def query(message: Message, context: Context) -> Message:
    """Reply with the site's capabilities (tasks, modalities, counts, policy, ε)."""

    def handler(site: Site, _: Message) -> SiteReply:
        return SiteReply(
            config={
                protocol.KEY_CAPABILITIES: json.dumps(site.capabilities()),
                protocol.KEY_SITE: site.name,
            }
        )

    return _serve(message, context, handler)


def _serve_stage(
    message: Message,
    context: Context,
    serve: Callable[[Site, protocol.StageRequest, dict[str, Tensor]], SiteReply],
) -> Message:
    """Decode a stage request (:func:`_request`) and answer ``serve(site, request, arrays)``."""

    def handler(site: Site, msg: Message) -> SiteReply:
        request, arrays = _request(msg, context)
        return serve(site, request, arrays)

    return _serve(message, context, handler)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the stage's components for one round on the site's data."""
    return _serve_stage(message, context, lambda site, request, arrays: site.train(request, arrays))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate every learned task on the requested split."""
    return _serve_stage(
        message, context, lambda site, request, arrays: site.evaluate(request, arrays)
    )
