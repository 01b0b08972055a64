"""The site refuses a plan past its own patch bound, for train and evaluate requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.errors import RequestRefused
from client.site import Site
from tests.conftest import tiny_plan
from unicon_model.protocol import StageRequest
from unicon_model.schema import validate_plan


def test_site_refuses_a_train_request_whose_patch_exceeds_its_policy(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny plan uses 16³ = 4096 voxels; this site accepts at most 2048
    policy = tmp_path / "policy.toml"
    policy.write_text("max_patch_voxels = 2048\n")
    site = Site(
        manifest_path=sites_dir / "hospital-a" / "manifest.yaml",
        state_dir=tmp_path / "state",
        policy_path=policy,
    )
    plan = validate_plan(tiny_plan())
    request = StageRequest(plan=plan, stage="foundation", server_round=1, run="r", digests={})
    # Execute
    with pytest.raises(RequestRefused) as caught:
        site.train(request, {})
    # Assert: the refusal names the plan field and the policy setting, is audited, and
    # nothing was trained, stored or spent
    message = str(caught.value)
    assert "data.patch_size = [16, 16, 16] is 4096 voxels per case" in message
    assert "max_patch_voxels = 2048" in message
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert "refused" in audit and "max_patch_voxels" in audit
    replies = tmp_path / "state" / "replies"
    assert not replies.exists() or not any(replies.iterdir())
    assert site.epsilon() == 0.0


def test_site_refuses_an_evaluate_request_whose_patch_exceeds_its_policy(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: as above, an evaluate request on the test split
    policy = tmp_path / "policy.toml"
    policy.write_text("max_patch_voxels = 2048\n")
    site = Site(
        manifest_path=sites_dir / "hospital-a" / "manifest.yaml",
        state_dir=tmp_path / "state",
        policy_path=policy,
    )
    plan = validate_plan(tiny_plan())
    request = StageRequest(
        plan=plan, stage="foundation", server_round=1, run="r", digests={}, split="test"
    )
    # Execute / Assert: refused before any data is read or metric computed
    with pytest.raises(RequestRefused, match=r"max_patch_voxels = 2048"):
        site.evaluate(request, {})
