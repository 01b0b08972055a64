"""``examples/plans/unicon_lora.toml``: the default plan whose task stages own encoder deltas.

Only the self-supervised foundation trains the backbone; classification, prognosis and
segmentation each train their head and low-rank deltas, which act on their own routes only.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch

from simulations.simulate_setup import plan_for_run
from unicon_model.components import BACKBONE
from unicon_model.model import UniconModel
from unicon_model.schema import load_plan

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "examples" / "plans" / "unicon_lora.toml"
DEFAULT = ROOT / "examples" / "plans" / "unicon.toml"
RANKS = {"lesion-class": 8, "survival": 4, "lesion-seg": 8}


def test_the_lora_plan_is_the_default_plan_with_task_deltas() -> None:
    lora, default = tomllib.loads(LORA.read_text()), tomllib.loads(DEFAULT.read_text())
    for mine, theirs in zip(lora["stages"], default["stages"], strict=True):
        tasks = mine.get("add_tasks", [])
        for task in tasks:
            assert task.pop("lora_rank", 0) == RANKS.get(task["name"], 0)
        if mine["name"] == "classification":
            # the default retrains the backbone and the CT adapter here; this plan does not
            assert theirs.pop("train") == ["backbone", "modality/ct", "task/lesion-class"]
        assert mine == theirs
    assert lora["model"] == default["model"] and lora["data"] == default["data"]


def test_only_the_foundation_trains_shared_components() -> None:
    plan = load_plan(LORA)
    for stage in plan.stages[1:]:
        assert BACKBONE not in stage.trained_components
        assert "modality/ct" not in stage.trained_components
    assert BACKBONE in plan.stages[0].trained_components
    # the quick scenario's transform keeps the deltas
    quick = plan_for_run(LORA, quick=True, dp=None, secure_sites=3)
    ranks = {
        t["name"]: t.get("lora_rank", 0) for s in quick["stages"] for t in s.get("add_tasks", [])
    }
    assert {n: ranks[n] for n in RANKS} == RANKS


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
