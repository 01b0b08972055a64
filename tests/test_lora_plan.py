"""``examples/plans/unicon.toml``: the default plan, whose task stages own encoder deltas.

Only the self-supervised foundation trains the backbone; classification, prognosis and
segmentation each train their head and low-rank deltas, which act on their own routes only.
``examples/plans/unicon_retrain.toml`` is the same scenario with a classification stage that
retrains the backbone instead (the default before); its PET stage has no encoder deltas and
runs 6 rounds, its segmentation stage 9 (this plan's run 10 and 12).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from simulations.simulate_setup import plan_for_run
from unicon_model.components import BACKBONE
from unicon_model.errors import PlanError
from unicon_model.model import UniconModel
from unicon_model.schema import load_plan, validate_plan

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "examples" / "plans" / "unicon.toml"
RETRAIN = ROOT / "examples" / "plans" / "unicon_retrain.toml"
RANKS = {"lesion-class": 8, "survival": 4, "lesion-seg": 8}
LONGER = {"segmentation": (12, 9), "pet": (10, 6)}
"""Stages this plan runs for more rounds than the retraining plan: (this plan's, that one's)."""


def test_the_default_plan_is_the_retraining_plan_with_task_deltas() -> None:
    lora, retrain = tomllib.loads(LORA.read_text()), tomllib.loads(RETRAIN.read_text())
    assert (lora["name"], retrain["name"]) == ("unicon-ct-pet", "unicon-ct-pet-retrain")
    for mine, theirs in zip(lora["stages"], retrain["stages"], strict=True):
        tasks = mine.get("add_tasks", [])
        for task in tasks:
            assert task.pop("lora_rank", 0) == RANKS.get(task["name"], 0)
        if mine["name"] == "classification":
            # the other plan retrains the backbone and the CT adapter here; this one does not
            assert theirs.pop("train") == ["backbone", "modality/ct", "task/lesion-class"]
        if mine["name"] == "pet":  # PET owns rank-8 encoder deltas here (PEMMA)
            assert mine["add_modalities"][0].pop("lora_rank") == 8
        if mine["name"] in LONGER:
            assert (mine.pop("rounds"), theirs.pop("rounds")) == LONGER[mine["name"]]
        assert mine == theirs
    assert lora["model"] == retrain["model"] and lora["data"] == retrain["data"]


def test_only_the_foundation_trains_shared_components() -> None:
    plan = load_plan(LORA)
    for stage in plan.stages[1:]:
        assert BACKBONE not in stage.trained_components
        assert "modality/ct" not in stage.trained_components
    assert BACKBONE in plan.stages[0].trained_components


def test_the_quick_scenario_keeps_deltas_its_narrow_encoder_can_hold() -> None:
    # Execute: --quick's encoder has widths (4, 8, 16): levels 0 and 1 hold rank 4 at most
    quick = plan_for_run(LORA, quick=True, dp=None, secure_sites=3)
    # Assert
    ranks = {
        t["name"]: t.get("lora_rank", 0) for s in quick["stages"] for t in s.get("add_tasks", [])
    }
    assert quick["model"]["widths"] == [4, 8, 16]
    assert {n: ranks[n] for n in RANKS} == {"lesion-class": 4, "survival": 4, "lesion-seg": 4}
    modalities = {m["name"]: m for s in quick["stages"] for m in s["add_modalities"]}
    assert modalities["pet"]["lora_rank"] == 4
    model = UniconModel.from_plan(validate_plan(quick))
    assert model.tasks["lesion-seg"].lora.rank == 4


def test_quick_leaves_deltas_on_levels_its_encoder_lacks_for_plan_check_to_name(
    tmp_path: Path,
) -> None:
    # Prepare: a 4-level plan whose survival deltas adapt level 3 only (--quick has 3 levels)
    raw = tomllib.loads(LORA.read_text())
    raw["model"]["widths"] = [8, 16, 32, 64]
    prognosis = next(s for s in raw["stages"] if s["name"] == "prognosis")
    prognosis["add_tasks"][0]["lora_levels"] = [3]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    # Execute
    quick = plan_for_run(path, quick=True, dp=None, secure_sites=3)
    # Assert: no crash; the rank is untouched and plan check names the missing level
    survival = next(t for s in quick["stages"] for t in s["add_tasks"] if t["name"] == "survival")
    assert survival["lora_rank"] == 4
    with pytest.raises(PlanError, match=r"lora_levels\[0\]: encoder level 3 does not exist"):
        validate_plan(quick)


def test_a_tasks_deltas_change_its_route_and_no_other() -> None:
    plan = load_plan(LORA)
    model = UniconModel.from_plan(plan).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    clinical = torch.zeros(1, 2)

    def outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {
                task: model(x, modality="ct", task=task, clinical=clinical).clone()
                for task in RANKS
            }

    before = outputs()
    deltas = [p for n, p in model.named_parameters() if n.startswith("tasks.lesion-seg.lora")]
    assert deltas
    with torch.no_grad():
        for p in deltas:
            p.add_(0.05 * torch.randn_like(p))
    after = outputs()

    assert not torch.equal(after["lesion-seg"], before["lesion-seg"])
    assert torch.equal(after["lesion-class"], before["lesion-class"])
    assert torch.equal(after["survival"], before["survival"])
