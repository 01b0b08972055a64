"""YAML of site manifests: written without aliases, read with aliases refused and depth bounded.

A manifest comes from outside the software (a hospital's file), so it is read with
:class:`ManifestYAMLLoader`, a safe loader that refuses aliases (what alias bombs are made
of) and nesting deeper than :data:`MAX_MANIFEST_DEPTH`; :func:`manifest_yaml` writes
manifests that loader accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import yaml

MAX_MANIFEST_DEPTH = 32
"""Deepest nesting of mappings and lists a manifest may have (a real one needs about 5)."""


class RefusedYAMLError(yaml.MarkedYAMLError):
    """A YAML construct a manifest may not use (an alias, or nesting beyond the limit)."""


class _NoAliasDumper(yaml.SafeDumper):
    """Writes every repeated object in full: manifests with aliases are refused on reading."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def manifest_yaml(data: Mapping[str, Any]) -> str:
    """YAML text of a manifest without anchors or aliases (which the manifest reader refuses).

    :func:`client.manifest.load_manifest` reads it back.

    Parameters
    ----------
    data
        The manifest's plain content (``site``, ``tasks``, ``cases``).
    """
    return yaml.dump(dict(data), Dumper=_NoAliasDumper, sort_keys=False)


class ManifestYAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and bounds the nesting depth.

    Aliases (``*name``) are what alias bombs ("billion laughs") are made of, and a manifest
    never needs one; nesting is bounded so that composing never recurses deeply.
    """

    # types-PyYAML leaves Parser.peek_event unannotated: declared here so that calls to it
    # are typed (an annotation only, the inherited method runs). Any: its stub's events
    # carry marks typed for the C parser too, which MarkedYAMLError does not accept.
    peek_event: Callable[[], Any]

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def _too_deep_error(self, mark: Any) -> RefusedYAMLError:
        return RefusedYAMLError(
            problem=f"the content is nested more than {MAX_MANIFEST_DEPTH} levels deep; a "
            "manifest needs only a few levels",
            problem_mark=mark,
        )

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 (PyYAML's name)
        # stop the scanner itself: deep flow nesting ([[[...) makes its look-ahead quadratic
        if self.flow_level >= MAX_MANIFEST_DEPTH:
            raise self._too_deep_error(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RefusedYAMLError(
                problem=f"found the alias *{event.anchor}; YAML aliases are not allowed in a "
                "manifest (write the value out in full)",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_MANIFEST_DEPTH:
                raise self._too_deep_error(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def too_deep(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists/mappings more than ``limit`` levels deep (iterative)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
