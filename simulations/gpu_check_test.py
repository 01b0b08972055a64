"""The GPU check's CPU reference part (CI has no GPU; the CUDA runs need one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simulations import gpu_check
from simulations.simulate_setup import plan_for_run
from unicon_model.schema import validate_plan


@pytest.mark.skipif(torch.cuda.is_available(), reason="exit status 2 is the no-CUDA answer")
def test_without_cuda_only_the_cpu_reference_runs_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--size", "16", "--cases", "16", "--epochs", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert status == 2
    assert list(report["runs"]) == ["cpu-fp32"]
    run = report["runs"]["cpu-fp32"]
    assert run["training_loss_after"] < run["training_loss_before"]
    assert run["max_metric_gap"] == 0.0  # the same weights evaluated twice on the CPU
    assert report["failures"] == []


def test_the_trainer_is_timed_against_a_bare_loop_that_trains_the_same_components(
    tmp_path: Path,
) -> None:
    # --quick's narrow model (widths 4, 8, 16, 16^3 patches; encoder deltas fitted to it)
    raw = plan_for_run(gpu_check.DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    plan = validate_plan(raw)
    train_set, _ = gpu_check._datasets(plan, tmp_path, size=16, cases=10)
    entry = gpu_check.trainer_vs_bare(
        plan, train_set, device=torch.device("cpu"), amp=True, epochs=1, warmup=False
    )
    assert entry["device"] == "cpu" and entry["batch_size"] == min(8, len(train_set))
    assert entry["trainer_seconds_per_epoch"] > 0 and entry["bare_seconds_per_epoch"] > 0
    assert entry["speed_ratio"] == pytest.approx(
        entry["bare_seconds_per_epoch"] / entry["trainer_seconds_per_epoch"]
    )
    assert 0.0 <= entry["bare_data_wait_fraction"] < 1.0
    assert entry["data_loading"]["num_workers"] == 0
    # the bare loop itself: only the stage's components train, and the loss goes down
    stage, tasks, model = gpu_check._stage_and_model(plan, epochs=2, batch_size=8)
    before = gpu_check.training_loss(model, train_set, tasks)
    gpu_check.bare_epochs(
        model, stage, train_set, tasks=tasks, device=torch.device("cpu"), amp=False, epochs=2
    )
    assert gpu_check.training_loss(model, train_set, tasks) < before
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("backbone.", "modalities.ct.", "tasks.")) for n in trained)
