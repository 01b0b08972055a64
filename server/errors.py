"""Errors raised by the coordinator package :mod:`server`."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error raised on purpose by the coordinator."""


class StageError(CoordinatorError):
    """A stage cannot run (too few eligible sites, every update rejected, ...)."""


class RegistryError(CoordinatorError):
    """The model registry is missing, inconsistent, or a version is unknown."""
