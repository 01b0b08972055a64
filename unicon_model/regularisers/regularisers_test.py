"""Regularisers against hand-computed values on models small enough to differentiate by hand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from unicon_model.model import UniconModel
from unicon_model.regularisers import EWC, LwF, ProximalAnchor, Regulariser
from unicon_model.regularisers.lwf import distillation_loss
from unicon_model.schema import ModalitySpec, ModelSpec, TaskSpec


class Linear(nn.Module):
    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


def squared_error(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    return 0.5 * (model(batch["x"]) - batch["y"]) ** 2


def test_ewc_fisher_is_the_mean_squared_per_example_gradient() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.randn(7)
    model = Linear([0.3, -0.2, 0.5])
    ewc = EWC(weight=4.0)
    ewc.consolidate(model, [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}], squared_error)
    residual = (x @ model.w.detach() - y)[:, None]
    expected = ((residual * x) ** 2).mean(dim=0)  # d/dw 0.5 (w.x - y)^2 = (w.x - y) x
    assert torch.allclose(ewc.fisher["w"], expected, atol=1e-6)
    assert set(ewc.fisher) == {"w"} and ewc.count == 7
    with torch.no_grad():
        model.w += torch.tensor([1.0, 2.0, -1.0])
    value = ewc.penalty(model, {}, torch.zeros(()))
    hand = 0.5 * 4.0 * float((expected * torch.tensor([1.0, 4.0, 1.0])).sum())
    assert float(value.detach()) == pytest.approx(hand, rel=1e-6)
    value.backward()
    assert model.w.grad is not None
    assert torch.allclose(model.w.grad, 4.0 * expected * torch.tensor([1.0, 2.0, -1.0]))


def test_ewc_merge_equals_the_fisher_of_pooled_data_and_state_round_trips() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(9, 3), torch.randn(9)
    parts = []
    for chunk in (slice(0, 2), slice(2, 9)):
        ewc = EWC(weight=1.0)
        ewc.consolidate(Linear([0.1, 0.2, 0.3]), [{"x": x[chunk], "y": y[chunk]}], squared_error)
        parts.append(ewc)
    pooled = EWC(weight=1.0)
    pooled.consolidate(Linear([0.1, 0.2, 0.3]), [{"x": x, "y": y}], squared_error)
    merged = EWC.merge(parts)
    assert merged.count == 9
    assert torch.allclose(merged.fisher["w"], pooled.fisher["w"], atol=1e-6)
    restored = EWC.from_state_dict(2.0, merged.state_dict())
    assert torch.equal(restored.fisher["w"], merged.fisher["w"]) and restored.count == 9
    with pytest.raises(ValueError, match="different parameters"):
        EWC.from_state_dict(1.0, {"fisher.a": torch.ones(1), "anchor.b": torch.ones(1)})


def test_proximal_anchor_gradient_is_mu_times_the_drift() -> None:
    model = Linear([1.0, 2.0, 3.0])
    prox = ProximalAnchor(mu=0.5)
    prox.set_anchor(model)
    assert set(prox.anchor) == {"w"}
    assert float(prox.penalty(model, {}, torch.zeros(()))) == 0.0
    with torch.no_grad():
        model.w += torch.tensor([2.0, 0.0, -4.0])
    value = prox.penalty(model, {}, torch.zeros(()))
    assert float(value) == pytest.approx(0.5 * 0.5 * (4.0 + 16.0))
    value.backward()
    assert model.w.grad is not None
    assert torch.allclose(model.w.grad, 0.5 * torch.tensor([2.0, 0.0, -4.0]))


def test_distillation_loss_matches_hand_computed_kl() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    t = 2.0
    p = F.softmax(teacher / t, dim=1)
    q = F.softmax(student / t, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1) * t * t
    assert torch.allclose(distillation_loss(student, teacher, "classification", t), kl)
    assert float(distillation_loss(student, teacher, "classification", t)[1]) == 0.0
    risk = distillation_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 3.0]), "survival", t)
    assert torch.equal(risk, torch.tensor([1.0, 0.0]))
    seg_s, seg_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    per_voxel = distillation_loss(
        seg_s.permute(0, 2, 3, 1).reshape(-1, 3),
        seg_t.permute(0, 2, 3, 1).reshape(-1, 3),
        "classification",
        t,
    ).reshape(2, 16)
    assert torch.allclose(
        distillation_loss(seg_s, seg_t, "segmentation", t), per_voxel.mean(dim=1), atol=1e-6
    )


def test_lwf_is_zero_at_the_teacher_and_pulls_a_drifted_model_back() -> None:
    model = UniconModel(ModelSpec(widths=(4, 8), seed=0))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(TaskSpec(name="cls", kind="classification", classes=("a", "b", "c")))
    model.add_task(TaskSpec(name="surv", kind="survival", covariates=("age",)))
    lwf = LwF.from_model(model, {"cls": "classification", "surv": "survival"}, weight=1.0)
    assert isinstance(lwf, Regulariser) and lwf.data_dependent
    assert all(not p.requires_grad for p in lwf.teacher.parameters())
    torch.manual_seed(0)
    batch = {
        "image": torch.randn(3, 1, 16, 16, 16),
        "modality": "ct",
        "surv:clinical": torch.randn(3, 1),
    }
    assert float(lwf.penalty(model, batch, torch.zeros(()))) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for p in model.tasks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    drifted = float(lwf.penalty(model, batch, torch.zeros(())))
    assert drifted > 0
    optimiser = torch.optim.SGD(model.tasks.parameters(), lr=0.005)
    for _ in range(20):
        optimiser.zero_grad()
        lwf.penalty(model, batch, torch.zeros(())).backward()
        optimiser.step()
    assert float(lwf.penalty(model, batch, torch.zeros(()))) < 0.5 * drifted


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        EWC(weight=-1)
    with pytest.raises(ValueError, match="mu"):
        ProximalAnchor(mu=-0.1)
    with pytest.raises(ValueError, match="unknown task kinds"):
        LwF(nn.Linear(1, 1), {"x": "regression"}, weight=1.0)
