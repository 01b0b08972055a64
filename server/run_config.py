"""The ServerApp's run config: every key declared once, with its type, default and help.

Flower hands the ServerApp (and every ClientApp) a flat run config: the defaults of
``[tool.flwr.app.config]`` in ``pyproject.toml`` overridden by ``flwr run --run-config``.
:class:`RunConfig` is that config, typed. Its fields are the keys (``site_wait`` is
``site-wait``); :meth:`RunConfig.from_flower` reads and checks what Flower hands over and
:meth:`RunConfig.to_flower` writes what ``unicon plan launch`` and the simulation pass to
``flwr run``. Flower requires the keys and defaults in ``pyproject.toml`` as well; a test
(:mod:`server.run_config_test`) keeps the two equal.

The holdout sites are not a run config key: they are part of the plan (``[evaluation]
holdout_sites``), so ``unicon plan launch --holdout-site`` writes a plan copy instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from server.errors import CoordinatorError
from unicon_model import wire

logger = logging.getLogger(__name__)

FlowerValue = str | int | float | bool
"""A value of Flower's run config."""


class RunConfigError(CoordinatorError, ValueError):
    """A run config value is missing or not of its kind (the message names the key and fix)."""


def _key(default: Any, help: str, *, positive: bool = False) -> Any:
    """A run config field: its ``default`` and ``help``; ``positive`` numbers must be > 0."""
    return field(default=default, metadata={"help": help, "positive": positive})


def _fix(key: str) -> str:
    """How to set ``key`` (ends every error about it)."""
    default = _field(key).default
    example = f"{default!r}" if isinstance(default, float) else '"..."'
    return f"set it with flwr run --run-config '{key}={example}' (unicon plan launch writes it)"


@dataclass(frozen=True)
class RunConfig:
    """The run config of the ServerApp (and of the simulated ClientApps).

    Attributes
    ----------
    plan
        Path of the plan file the ServerApp runs (required to run).
    registry
        Registry directory (required to run).
    stage
        Run only this stage (empty: every pending stage).
    site_wait, query_timeout, evaluate_timeout
        Seconds to wait for eligible sites, for the answers to a query, and for
        evaluation replies after a stage.
    site_dirs
        Simulation only: site folders; simulated node ``partition-id`` ``i`` serves folder
        ``i`` (a JSON list in Flower's config, empty string when none).
    state_root
        Simulation only: parent of the sites' state directories.
    max_message_mb
        Fixed cap on a reply's array bytes in MiB (Flower's own gRPC limit);
        :attr:`max_message_bytes` is it in bytes.
    """

    plan: str = _key("", "Path of the plan file (TOML or JSON) the ServerApp runs.")
    registry: str = _key("", "Registry directory.")
    stage: str = _key("", "Run only this stage.")
    site_wait: float = _key(120.0, "Seconds to wait for eligible sites.")
    query_timeout: float = _key(60.0, "Seconds to wait for the sites' answers to a query.")
    evaluate_timeout: float = _key(600.0, "Seconds to wait for evaluation replies after a stage.")
    site_dirs: tuple[str, ...] = _key(
        (), "Simulation only: site folders (JSON list); node partition-id i serves folder i."
    )
    state_root: str = _key("", "Simulation only: parent of the sites' state directories.")
    max_message_mb: float = _key(
        2048.0,
        "Fixed cap on a reply's array bytes in MiB (Flower's own gRPC limit).",
        positive=True,
    )

    SOURCE: ClassVar[str] = "run config"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, float):
                _check_number(_flower_key(f.name), value, positive=f.metadata["positive"])

    @classmethod
    def flower_keys(cls) -> tuple[str, ...]:
        """Flower's names of the keys, in declaration order (``site-wait``, ...)."""
        return tuple(_flower_key(f.name) for f in dataclasses.fields(cls))

    @classmethod
    def help(cls, key: str) -> str:
        """The help text of ``key`` (Flower's name)."""
        return str(_field(key).metadata["help"])

    @classmethod
    def from_flower(cls, values: Mapping[str, Any], *, require: Iterable[str] = ()) -> RunConfig:
        """The typed run config of Flower's ``context.run_config``.

        Parameters
        ----------
        values
            Flower's run config; absent keys take their defaults, unknown keys are logged
            and ignored. Numbers may also be given as strings (``"30"``).
        require
            Keys (Flower's names) that must be present and not empty (``"plan"``).

        Raises
        ------
        RunConfigError
            A required key is missing or empty, or a value is not of its kind (the message
            names the key and how to set it).
        """
        for key in values:
            if key not in cls.flower_keys():
                logger.warning(
                    "run config key %r is not one of %s; ignored", key, cls.flower_keys()
                )
        parsed: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = _flower_key(f.name)
            if key in values:
                parsed[f.name] = _parse(key, values[key], f.default)
        config = cls(**parsed)
        for key in require:
            if not config.to_flower()[key]:
                raise RunConfigError(f"{cls.SOURCE} lacks '{key}' ({cls.help(key)}); {_fix(key)}")
        return config

    def to_flower(self) -> dict[str, FlowerValue]:
        """Every key with its value as Flower's run config holds it (``site-dirs`` as JSON)."""
        values: dict[str, FlowerValue] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = json.dumps(list(value)) if value else ""
            values[_flower_key(f.name)] = value
        return values

    @property
    def max_message_bytes(self) -> int:
        """``max-message-mb`` in bytes (:func:`unicon_model.wire.limit_from_config`)."""
        return wire.limit_from_config({wire.LIMIT_KEY: self.max_message_mb}, source=self.SOURCE)


def _flower_key(name: str) -> str:
    """Flower's name of the field ``name`` (``site_wait`` -> ``site-wait``)."""
    return name.replace("_", "-")


def _field(key: str) -> dataclasses.Field[Any]:
    """The field of Flower's key ``key``."""
    for f in dataclasses.fields(RunConfig):
        if _flower_key(f.name) == key:
            return f
    raise KeyError(f"{key!r} is not a run config key (one of {RunConfig.flower_keys()})")


def _parse(key: str, raw: Any, default: Any) -> Any:
    """``raw`` as the kind of ``default`` (text, a number, or a JSON list of texts)."""
    if isinstance(default, tuple):
        return _parse_list(key, raw)
    if not isinstance(default, float):
        return str(raw)
    number = None
    if isinstance(raw, int | float | str) and not isinstance(raw, bool):
        with contextlib.suppress(ValueError):
            number = float(raw)
    if number is None:
        raise RunConfigError(f"{RunConfig.SOURCE} '{key}' = {raw!r} is not a number; {_fix(key)}")
    return number


def _parse_list(key: str, raw: Any) -> tuple[str, ...]:
    """A JSON list of texts (``""``: none)."""
    if raw == "":
        return ()
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RunConfigError(
            f"{RunConfig.SOURCE} '{key}' = {raw!r} is not a JSON list of folders as a "
            'string (\'["/data/site-a", "/data/site-b"]\'); the simulation writes it'
        )
    return tuple(value)


def _check_number(key: str, value: Any, *, positive: bool) -> None:
    """Refuse a value that is not a finite number >= 0 (> 0 when ``positive``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 if positive else value >= 0):
        return
    bound = "> 0" if positive else ">= 0"
    raise RunConfigError(
        f"{RunConfig.SOURCE} '{key}' = {value!r}: give a finite number {bound}; " + _fix(key)
    )
