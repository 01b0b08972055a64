"""The GPU check's CPU reference part (CI has no GPU; the CUDA runs need one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simulations import gpu_check


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
