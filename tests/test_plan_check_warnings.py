"""`unicon plan check` warns loudly about heads trained on a random, frozen encoder."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from unicon_model.cli import app
from unicon_model.schema import load_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plans" / "unicon.toml"
runner = CliRunner()

HEADS_ONLY = """
name = "heads-only"
[[stages]]
name = "first"
add_modalities = [{ name = "ct" }]
add_tasks = [{ name = "cls", kind = "classification", classes = ["a", "b"] }]
"""


def test_plan_check_warns_about_a_first_stage_on_a_random_frozen_encoder(
    tmp_path: Path,
) -> None:
    # Prepare: a valid plan whose first stage does not list `backbone` under `train`
    plan = tmp_path / "heads.toml"
    plan.write_text(HEADS_ONLY)
    # Execute
    result = runner.invoke(app, ["plan", "check", str(plan)])
    # Assert: still valid (exit 0), but a WARNING naming the field, the problem and the fix
    output = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "WARNING stages[0].train: stage 'first' trains ['modality/ct', 'task/cls']" in output
    assert "random, frozen encoder" in output
    assert 'train = ["backbone", "modality/ct", "task/cls"]' in output
    assert "is valid, with 1 warning(s)" in output
    assert "Training augmentation: off" in output


def test_plan_check_of_the_default_plan_has_no_warning() -> None:
    # the default plan's first stage trains the encoder itself
    assert "backbone" in load_plan(EXAMPLE).stages[0].trained_components
    result = runner.invoke(app, ["plan", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output
    assert "is valid." in result.output
    assert "Training augmentation: off" in result.output


def test_plan_check_summarises_the_augmentation_in_use(tmp_path: Path) -> None:
    plan = tmp_path / "augmented.toml"
    text = EXAMPLE.read_text()
    stages = text.index("[[stages]]")
    plan.write_text(
        text[:stages]
        + "[data.augmentation]\nflip_prob = 0.5\naffine_prob = 0.2\n\n"
        + text[stages:]
    )
    result = runner.invoke(app, ["plan", "check", str(plan)])
    assert result.exit_code == 0, result.output
    assert "Training augmentation: flips p=0.5 per axis, affine p=0.2" in result.output


def test_plan_check_warns_about_patience_without_validation(tmp_path: Path) -> None:
    # Prepare: patience on a stage that never validates
    plan = tmp_path / "patience.toml"
    plan.write_text(
        HEADS_ONLY.replace(
            'name = "first"', 'name = "first"\npatience = 2\nvalidate_every = 0'
        ).replace("add_tasks", 'train = ["backbone", "modality/ct", "task/cls"]\nadd_tasks')
    )
    # Execute
    result = runner.invoke(app, ["plan", "check", str(plan)])
    # Assert
    output = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "WARNING stages[0].patience: stage 'first' sets patience = 2 but validate_every = 0" in (
        output
    )
    assert "is valid, with 1 warning(s)" in output
