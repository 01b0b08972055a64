"""Tests of the C-index against lifelines and of the Cox loss against a plain double loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_concordance_index

from unicon_model.metrics import survival
from unicon_model.metrics.survival import concordance_index, cox_partial_likelihood_loss


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_concordance_index_equals_lifelines_with_heavy_ties(seed: int) -> None:
    # Prepare: times rounded to integers, risks to one decimal, ~40 % censored
    rng = np.random.default_rng(seed)
    n = 400
    time = np.round(rng.exponential(4.0, size=n)) + 1.0
    risk = np.round(rng.normal(size=n) - 0.1 * time, 1)
    event = (rng.random(n) < 0.6).astype(int)
    expected = lifelines_concordance_index(time, -risk, event)
    # Execute
    result = concordance_index(time, risk, event)
    # Assert
    assert abs(result - expected) < 1e-12


def test_concordance_index_chunked_equals_lifelines(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: force blocks of a few event rows so several chunks are summed
    monkeypatch.setattr(survival, "_MAX_PAIR_CELLS", 1000)
    rng = np.random.default_rng(7)
    time = np.round(rng.exponential(3.0, size=300)) + 1.0
    risk = np.round(rng.normal(size=300), 1)
    event = rng.random(300) < 0.5
    expected = lifelines_concordance_index(time, -risk, event)
    # Execute
    result = concordance_index(time, risk, event)
    # Assert
    assert abs(result - expected) < 1e-12


def test_concordance_index_hand_computed() -> None:
    # Prepare: time (1, 2, 2, 3), event (1, 1, 0, 0), risk (0.9, 0.5, 0.5, 0.7).
    # Comparable pairs (event i first): (0,1) (0,2) (0,3); (1,2) equal times, only 1 had the
    # event; (1,3). Concordant if risk_i > risk_j: (0,1) yes, (0,2) yes, (0,3) yes,
    # (1,2) tie -> 0.5, (1,3) 0.5 < 0.7 no. C = (3 + 0.5) / 5 = 0.7
    time = [1.0, 2.0, 2.0, 3.0]
    event = [1, 1, 0, 0]
    risk = [0.9, 0.5, 0.5, 0.7]
    # Execute / Assert
    assert concordance_index(time, risk, event) == pytest.approx(0.7, abs=1e-15)


def test_concordance_index_errors() -> None:
    with pytest.raises(ValueError, match="no comparable pair"):
        concordance_index([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="no comparable pair"):
        concordance_index([2.0, 2.0], [0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        concordance_index([1.0, 2.0], [0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match=r"time\[1\] = 0.0"):
        concordance_index([1.0, 0.0], [0.1, 0.2], [1, 0])
    with pytest.raises(ValueError, match="risk contains NaN"):
        concordance_index([1.0, 2.0], [0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="event must hold only 0"):
        concordance_index([1.0, 2.0], [0.1, 0.2], [2, 0])


def breslow_reference(risk: list[float], time: list[float], event: list[int]) -> float:
    """Negative log Cox partial likelihood, Breslow ties, mean over events: plain loops."""
    total = 0.0
    n_events = 0
    for i in range(len(risk)):
        if not event[i]:
            continue
        n_events += 1
        denominator = 0.0
        for j in range(len(risk)):
            if time[j] >= time[i]:
                denominator += math.exp(risk[j])
        total += risk[i] - math.log(denominator)
    return -total / n_events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cox_loss_matches_double_loop_with_ties(seed: int) -> None:
    # Prepare: integer times (many ties), ~30 % censored
    rng = np.random.default_rng(seed)
    n = 40
    risk = rng.normal(size=n)
    time = np.round(rng.exponential(3.0, size=n)) + 1.0
    event = (rng.random(n) < 0.7).astype(int)
    event[0] = 1
    expected = breslow_reference(risk.tolist(), time.tolist(), event.tolist())
    # Execute
    loss = cox_partial_likelihood_loss(
        torch.tensor(risk, dtype=torch.float64).unsqueeze(1),
        torch.tensor(time),
        torch.tensor(event),
    )
    # Assert
    assert abs(float(loss) - expected) < 1e-6


def test_cox_loss_is_stable_for_large_risks() -> None:
    # Prepare: risks near 1000 overflow a naive exp; shifting all risks leaves the loss unchanged
    risk = [1.0, -0.5, 2.0, 0.3]
    time = [2.0, 1.0, 2.0, 3.0]
    event = [1, 1, 0, 1]
    expected = breslow_reference(risk, time, event)
    shifted = torch.tensor(risk, dtype=torch.float32) + 1000.0
    # Execute
    loss = cox_partial_likelihood_loss(shifted, torch.tensor(time), torch.tensor(event))
    # Assert
    assert abs(float(loss) - expected) < 1e-4


def test_cox_loss_gradcheck() -> None:
    # Prepare
    generator = torch.Generator().manual_seed(0)
    risk = torch.randn(12, dtype=torch.float64, generator=generator, requires_grad=True)
    time = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 4.0, 1.0, 2.0, 6.0, 3.0, 3.0, 7.0])
    event = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1])
    # Execute / Assert
    assert torch.autograd.gradcheck(
        lambda r: cox_partial_likelihood_loss(r, time, event), (risk,), eps=1e-6, atol=1e-6
    )


def test_cox_loss_without_events_is_connected_zero() -> None:
    # Prepare
    risk = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    # Execute
    loss = cox_partial_likelihood_loss(risk, torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    loss.backward()
    # Assert
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    assert risk.grad is not None
    assert risk.grad.tolist() == [0.0, 0.0, 0.0]


def test_cox_loss_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same non-zero length"):
        cox_partial_likelihood_loss(torch.zeros(3), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="event must hold only 0"):
        cox_partial_likelihood_loss(torch.zeros(2), torch.ones(2), torch.tensor([2, 0]))
