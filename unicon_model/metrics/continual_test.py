"""Tests of continual-learning metrics against hand-computed values."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from unicon_model.metrics.continual import (
    ContinualSummary,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    summarise,
)

NAN = float("nan")

# 3 stages x 3 tasks, task j learned at stage j (default introduced_at = [0, 1, 2]).
R3 = np.array(
    [
        [0.7, 0.2, 0.3],  # after stage 0 (tasks 1, 2 evaluated with untrained heads)
        [0.9, 0.7, 0.25],  # after stage 1
        [0.6, 0.65, 0.8],  # after stage 2 (last)
    ]
)
BASELINE3 = [0.1, 0.1, 0.2]


def test_three_by_three_hand_computed() -> None:
    # Prepare: the arithmetic, T = 3
    # ACC = (0.6 + 0.65 + 0.8) / 3 = 2.05 / 3
    # BWT over tasks 0, 1: ((0.6 - 0.7) + (0.65 - 0.7)) / 2 = (-0.1 - 0.05) / 2 = -0.075
    # FWT over tasks 1, 2: ((R[0,1] - 0.1) + (R[1,2] - 0.2)) / 2 = (0.1 + 0.05) / 2 = 0.075
    # forgetting: task 0 max(0.7, 0.9) - 0.6 = 0.3; task 1 max(0.7) - 0.65 = 0.05 -> 0.175
    # Execute
    summary = summarise(R3, baseline=BASELINE3)
    # Assert
    assert average_accuracy(R3) == pytest.approx(2.05 / 3, abs=1e-12)
    assert backward_transfer(R3) == pytest.approx(-0.075, abs=1e-12)
    assert forward_transfer(R3, BASELINE3) == pytest.approx(0.075, abs=1e-12)
    assert average_forgetting(R3) == pytest.approx(0.175, abs=1e-12)
    assert isinstance(summary, ContinualSummary)
    assert dataclasses.astuple(summary) == pytest.approx((2.05 / 3, -0.075, 0.075, 0.175))


def test_three_stages_two_tasks_with_introduced_at() -> None:
    # Prepare: task 0 learned at stage 0, task 1 at stage 2; task 1 is NaN after stage 0
    # (not evaluated) and evaluated with its untrained head after stage 1.
    results = np.array([[0.8, NAN], [0.7, 0.3], [0.75, 0.9]])
    introduced_at = [0, 2]
    baseline = [0.5, 0.25]
    # ACC = (0.75 + 0.9) / 2 = 0.825
    # BWT over task 0 only (task 1 introduced at the last stage): 0.75 - 0.8 = -0.05
    # FWT over task 1 only (task 0 introduced at stage 0): R[1, 1] - 0.25 = 0.05
    # forgetting, task 0: max(R[0, 0], R[1, 0]) - R[2, 0] = 0.8 - 0.75 = 0.05
    # Execute
    summary = summarise(results, introduced_at, baseline)
    # Assert
    assert summary.acc == pytest.approx(0.825, abs=1e-12)
    assert summary.bwt == pytest.approx(-0.05, abs=1e-12)
    assert summary.fwt == pytest.approx(0.05, abs=1e-12)
    assert summary.forgetting == pytest.approx(0.05, abs=1e-12)


def test_undefined_metrics_are_nan() -> None:
    # Prepare: one stage; and a task whose pre-introduction entry was not evaluated
    single = np.array([[0.8, NAN]])
    unevaluated = np.array([[0.8, NAN], [0.7, NAN], [0.75, 0.9]])
    # Execute
    summary = summarise(single)
    # Assert: ACC over task 0 only; BWT/forgetting need two stages; FWT needs a baseline
    assert summary.acc == pytest.approx(0.8)
    assert math.isnan(summary.bwt)
    assert math.isnan(summary.forgetting)
    assert math.isnan(summary.fwt)
    assert math.isnan(forward_transfer(unevaluated, [0.5, 0.25], introduced_at=[0, 2]))


def test_summary_is_frozen() -> None:
    summary = summarise(R3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.acc = 1.0  # type: ignore[misc]


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="2-D matrix"):
        average_accuracy([0.1, 0.2])
    with pytest.raises(ValueError, match="one stage per task"):
        backward_transfer(R3, introduced_at=[0, 1])
    with pytest.raises(ValueError, match=r"introduced_at\[1\] = -1"):
        average_forgetting(R3, introduced_at=[0, -1, 2])
    with pytest.raises(ValueError, match=r"R\[2, 1\] is NaN but task 1 was learned"):
        average_accuracy(np.array([[0.8, NAN], [0.7, 0.3], [0.75, NAN]]), introduced_at=[0, 1])
    with pytest.raises(ValueError, match="baseline must have shape"):
        forward_transfer(R3, [0.1, 0.2])
    with pytest.raises(ValueError, match="infinite"):
        average_accuracy(np.array([[np.inf]]))
