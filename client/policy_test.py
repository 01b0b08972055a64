"""Tests of the site policy: loading from TOML/YAML/JSON, every problem reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from client.errors import PolicyError, RequestRefused
from client.policy import (
    SitePolicy,
    data_problems,
    default_policy,
    enforce,
    enforce_data,
    load_policy,
    request_problems,
)
from unicon_model.schema import MAX_PATCH_VOXELS, DataSpec, PrivacySpec, StageSpec

TOML = """
max_epsilon = 10.0
delta = 1e-6
require_privacy = true
allowed_tasks = ["lesion-class", "survival"]
allowed_modalities = ["ct"]
max_rounds_per_stage = 5
"""

YAML = """
max_epsilon: 10.0
delta: 1.0e-6
require_privacy: true
allowed_tasks: [lesion-class, survival]
allowed_modalities: [ct]
max_rounds_per_stage: 5
"""

EXPECTED = SitePolicy(
    max_epsilon=10.0,
    delta=1e-6,
    require_privacy=True,
    allowed_tasks=("lesion-class", "survival"),
    allowed_modalities=("ct",),
    max_rounds_per_stage=5,
)


def test_policy_loads_equally_from_toml_yaml_and_json(tmp_path: Path) -> None:
    # Prepare: the same policy in the three formats
    (tmp_path / "p.toml").write_text(TOML)
    (tmp_path / "p.yaml").write_text(YAML)
    (tmp_path / "p.json").write_text(json.dumps(EXPECTED.model_dump(mode="json")))
    # Execute
    loaded = [load_policy(tmp_path / name) for name in ("p.toml", "p.yaml", "p.json")]
    # Assert: every field equals the hand-written values
    for policy in loaded:
        assert policy == EXPECTED
        assert policy.max_epsilon == 10.0
        assert policy.delta == 1e-6
        assert policy.max_rounds_per_stage == 5
        assert policy.allowed_tasks == ("lesion-class", "survival")


def test_default_policy_has_no_cap_and_accounts_at_1e_5() -> None:
    # Prepare / Execute
    policy = default_policy()
    # Assert
    assert policy.max_epsilon is None
    assert policy.delta == 1e-5
    assert policy.require_privacy is False
    assert policy.allowed_tasks is None and policy.allowed_modalities is None
    assert policy.max_rounds_per_stage is None
    with pytest.raises(pydantic.ValidationError):
        policy.delta = 0.1


def test_policy_file_problems_are_listed_together(tmp_path: Path) -> None:
    # Prepare: four independent problems in one file
    path = tmp_path / "site.toml"
    path.write_text(
        'max_epsilon = -1.0\ndelta = 2.0\nallowed_tasks = ["Lesion Class"]\nmax_epsilonn = 3\n'
    )
    # Execute
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    # Assert: one error naming the file, with exactly the four problems
    message = str(caught.value)
    assert str(path) in message
    assert message.startswith(f"4 problem(s) in site policy {path}")
    assert "max_epsilon: Input should be greater than 0" in message
    assert "delta: Input should be less than 1" in message
    assert "allowed_tasks.0: String should match pattern" in message
    assert "max_epsilonn: unknown field" in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.toml", "max_epsilon = ", "not valid TOML"),
        ("bad.yaml", "max_epsilon: [1,", "not valid YAML"),
        ("bad.json", "[1, 2]", "must be a table/mapping at the top level, got list"),
        ("bad.ini", "max_epsilon=1", "unknown format '.ini'"),
        ("missing.toml", None, "cannot read the file"),
    ],
)
def test_unreadable_policy_files_name_the_file(
    tmp_path: Path, name: str, text: str | None, expected: str
) -> None:
    # Prepare
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    # Execute
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    # Assert: 1 problem, naming the file and the cause
    assert str(caught.value).startswith(f"1 problem(s) in site policy {path}")
    assert expected in str(caught.value)


def test_every_refusal_reason_is_listed_together() -> None:
    # Prepare: a stage violating all five rules at once
    policy = EXPECTED
    stage = StageSpec(name="s", rounds=7, privacy=PrivacySpec(mode="central", delta=1e-5))
    tasks = ["lesion-class", "lesion-seg"]
    modalities = ["ct", "pet", "mri"]
    # Execute
    problems = request_problems(policy, stage, stage_tasks=tasks, stage_modalities=modalities)
    with pytest.raises(RequestRefused) as caught:
        enforce(policy, stage, stage_tasks=tasks, stage_modalities=modalities)
    # Assert: 1 task + 2 modalities + privacy mode + rounds (delta is checked for local DP only)
    assert len(problems) == 5
    assert sum("task 'lesion-seg'" in p for p in problems) == 1
    assert sum("modality 'pet'" in p or "modality 'mri'" in p for p in problems) == 2
    assert sum("requires local differential privacy" in p for p in problems) == 1
    assert sum("rounds = 7 exceeds the site's max_rounds_per_stage = 5" in p for p in problems) == 1
    assert str(caught.value).startswith("the site refuses stage 's' (5 reason(s))")
    assert all(p in str(caught.value) for p in problems)


def test_local_dp_with_a_larger_delta_is_refused_and_a_compliant_stage_accepted() -> None:
    # Prepare
    policy = EXPECTED
    loose = StageSpec(name="loose", rounds=5, privacy=PrivacySpec(mode="local", delta=1e-5))
    strict = StageSpec(name="strict", rounds=5, privacy=PrivacySpec(mode="local", delta=1e-6))
    # Execute
    loose_problems = request_problems(
        policy, loose, stage_tasks=["survival"], stage_modalities=["ct"]
    )
    strict_problems = request_problems(
        policy, strict, stage_tasks=["survival"], stage_modalities=["ct"]
    )
    # Assert: exactly the delta problem, and none for the compliant stage
    assert loose_problems == [
        "stage 'loose': privacy.delta = 1e-05 is larger than the site's delta 1e-06; "
        "use privacy.delta <= 1e-06"
    ]
    assert strict_problems == []
    enforce(policy, strict, stage_tasks=["survival"], stage_modalities=["ct"])
    assert (
        request_problems(default_policy(), loose, stage_tasks=["x"], stage_modalities=["y"]) == []
    )


# ---------------------------------------------------------------- data bounds (issue 12)


def test_a_site_lowers_the_patch_bound_in_its_policy(tmp_path: Path) -> None:
    # Prepare: a policy accepting at most 32³ voxels per case; a stage of a plan with 64³
    path = tmp_path / "site.toml"
    path.write_text("max_patch_voxels = 32768\n")
    policy = load_policy(path)
    stage = StageSpec(name="s")
    large, small = DataSpec(patch_size=(64, 64, 64)), DataSpec(patch_size=(32, 32, 32))
    # Execute
    problems = request_problems(
        policy, stage, stage_tasks=["t"], stage_modalities=["ct"], data=large
    )
    with pytest.raises(RequestRefused) as train_refusal:
        enforce(policy, stage, stage_tasks=["t"], stage_modalities=["ct"], data=large)
    with pytest.raises(RequestRefused) as evaluate_refusal:
        enforce_data(policy, large, stage="s")
    # Assert: the field, the size and the policy setting are named; a small patch passes
    assert policy.max_patch_voxels == 32768
    assert problems == [
        "stage 's': data.patch_size = [64, 64, 64] is 262144 voxels per case, more than the "
        "site's max_patch_voxels = 32768; use a smaller patch"
    ]
    assert str(train_refusal.value).startswith("the site refuses stage 's' (1 reason(s))")
    assert "max_patch_voxels = 32768" in str(evaluate_refusal.value)
    assert data_problems(policy, small) == []
    enforce(policy, stage, stage_tasks=["t"], stage_modalities=["ct"], data=small)
    enforce_data(policy, small, stage="s")
    # the default policy keeps the schema's own bound only
    assert data_problems(default_policy(), DataSpec(patch_size=(256, 256, 256))) == []


def test_a_policy_patch_bound_above_the_schema_maximum_or_non_finite_numbers_are_refused(
    tmp_path: Path,
) -> None:
    # Prepare
    path = tmp_path / "site.toml"
    path.write_text(f"max_patch_voxels = {MAX_PATCH_VOXELS + 1}\nmax_epsilon = inf\n")
    # Execute
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    # Assert: both problems, each naming its field
    message = str(caught.value)
    assert message.startswith(f"2 problem(s) in site policy {path}")
    assert f"max_patch_voxels: Input should be less than or equal to {MAX_PATCH_VOXELS}" in message
    assert "max_epsilon: Input should be a finite number" in message


@pytest.mark.parametrize("value", ["0", "-3", "nan", "1000001", '"five"'])
def test_a_bad_evaluation_minimum_is_refused_naming_the_field(tmp_path: Path, value: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(f"min_evaluation_cases = {value}\n")
    with pytest.raises(PolicyError, match="min_evaluation_cases"):
        load_policy(path)
