"""The plan digest: pinned pretrained weights are identified by their sha256, not their path."""

from __future__ import annotations

import hashlib
from typing import Any

from server.coordinator import plan_digest
from tests.conftest import tiny_plan
from unicon_model.schema import validate_plan

PIN = "a" * 64


def seeded(path: str, sha256: str | None) -> dict[str, Any]:
    raw = tiny_plan()
    pretrained: dict[str, Any] = {"path": path, "format": "unicon", "components": ["backbone"]}
    if sha256 is not None:
        pretrained["sha256"] = sha256
    raw["model"] = {**raw["model"], "pretrained": pretrained}
    return raw


def test_pinned_weights_give_the_same_digest_wherever_they_lie() -> None:
    here = plan_digest(validate_plan(seeded("/tmp/a/v0002", PIN)))
    there = plan_digest(validate_plan(seeded("/srv/b/v0002", PIN)))
    assert here == there
    # other weights (another pin) are another run
    assert plan_digest(validate_plan(seeded("/tmp/a/v0002", "b" * 64))) != here


def test_unpinned_weights_are_identified_by_their_path_and_other_plans_digest_as_before() -> None:
    a = plan_digest(validate_plan(seeded("/tmp/a/v0002", None)))
    b = plan_digest(validate_plan(seeded("/srv/b/v0002", None)))
    assert a != b
    plain = validate_plan(tiny_plan())
    assert plan_digest(plain) == hashlib.sha256(plain.model_dump_json().encode()).hexdigest()
    unpinned = validate_plan(seeded("/tmp/a/v0002", None))
    assert a == hashlib.sha256(unpinned.model_dump_json().encode()).hexdigest()
