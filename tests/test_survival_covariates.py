"""Survival on real covariates (issue 11, item 7): the Cox loss, the head, and a federation.

The federated run writes lifelines' ``rossi`` data (bundled CSV, no download) as four
non-IID sites (age quartiles) whose images are all the same, trains the survival head over
the real coordinator and ClientApp, and compares its pooled test C-index with lifelines'
``CoxPHFitter`` fitted on the pooled training cases and scored on the same test cases.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data import build_dataset, label_key
from client.losses import cox_per_sample
from client.manifest import load_manifest
from client.trainer import predict
from server.coordinator import Coordinator
from server.registry import Registry
from simulations import rossi
from simulations.inprocess import InProcessTransport, seeded_numpy
from unicon_model.heads import SurvivalHead
from unicon_model.metrics import concordance_index
from unicon_model.schema import validate_plan

lifelines = pytest.importorskip("lifelines")
COVARIATES = list(rossi.COVARIATES)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: tiny convolutions run far faster than on contended threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cox_loss_hand_computed_with_efron_ties() -> None:
    # Prepare: two events tied at t=1 (risks 0 and ln 2), one censored at 2, and an
    # unlabelled sample with a huge risk that must be in no risk set
    risk = torch.tensor([0.0, math.log(2.0), 0.0, 50.0])
    time_ = torch.tensor([1.0, 1.0, 2.0, 5.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    labelled = torch.tensor([True, True, True, False])
    # Execute
    terms = cox_per_sample(risk, time_, event, labelled)
    # Assert: S_R = 1 + 2 + 1 = 4, S_D = 3; Efron: log 4 and -(ln 2 - log(4 - 3/2))
    expected = torch.tensor([math.log(4.0), math.log(1.25), 0.0, 0.0])
    assert torch.allclose(terms, expected, atol=1e-6)
    assert float(terms.sum()) == pytest.approx(math.log(5.0), abs=1e-6)


def test_cox_loss_equals_lifelines_partial_likelihood_on_rossi() -> None:
    # Prepare: lifelines' Cox fit (Efron ties) on rossi, 49 distinct weeks for 114 events
    frame = rossi.load_rossi()
    cox = lifelines.CoxPHFitter().fit(frame, rossi.DURATION, rossi.EVENT)
    x = torch.tensor(frame[COVARIATES].to_numpy(), dtype=torch.float64)
    beta = torch.tensor(cox.params_[COVARIATES].to_numpy(), requires_grad=True)
    time_ = torch.tensor(frame[rossi.DURATION].to_numpy(), dtype=torch.float32)
    event = torch.tensor(frame[rossi.EVENT].to_numpy(), dtype=torch.float32)
    labelled = torch.ones(len(frame), dtype=torch.bool)
    order = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0))
    # Execute: in file order and shuffled (the tie order within a time must not matter)
    loss = cox_per_sample(x @ beta, time_, event, labelled).sum()
    shuffled = cox_per_sample((x @ beta)[order], time_[order], event[order], labelled).sum()
    loss.backward()
    # Assert: the negative log partial likelihood lifelines maximised, and its optimum
    assert float(loss.detach()) == pytest.approx(-cox.log_likelihood_, rel=1e-6)
    assert float(shuffled.detach()) == pytest.approx(-cox.log_likelihood_, rel=1e-6)
    assert beta.grad is not None and float(beta.grad.abs().max()) < 1e-2


def test_survival_head_adds_a_linear_covariate_term_that_starts_at_zero() -> None:
    # Prepare: the same image features for every case, different covariates
    head = SurvivalHead((4, 8), num_covariates=3, hidden=4)
    features = [torch.ones(5, 4, 2, 2, 2), torch.ones(5, 8, 1, 1, 1)]
    clinical = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    # Execute
    before = head(features, clinical)
    assert head.covariates is not None
    with torch.no_grad():
        head.covariates.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    after = head(features, clinical)
    # Assert: zero-initialised, then exactly x @ beta on top of one image offset
    assert torch.allclose(before, before[0].expand(5))
    assert torch.allclose(after - before, clinical @ torch.tensor([0.5, -1.0, 2.0]), atol=1e-6)
    with pytest.raises(ValueError, match=r"clinical covariates of shape \(5, 3\), got None"):
        head(features, None)


def test_federated_survival_on_rossi_matches_cox_regression(
    tmp_path: Path, one_thread: None
) -> None:
    # Prepare: four age-quartile sites, a quarter of each held out for test
    started = time.perf_counter()
    folders = rossi.write_rossi_sites(tmp_path / "sites", sites=4, by="age", seed=0)
    plan = validate_plan(rossi.rossi_plan())
    registry = Registry(tmp_path / "registry")
    # Execute
    with seeded_numpy(0):
        Coordinator(
            plan, registry, InProcessTransport(folders, tmp_path / "state"), site_wait=0
        ).run()
    model, _ = registry.load(registry.versions()[-1])
    task, modality = plan.stages[0].add_tasks[0], plan.stages[0].add_modalities[0]
    risks, times, events = [], [], []
    for folder in folders:
        test = build_dataset(
            load_manifest(folder / "manifest.yaml"),
            split="test",
            modality=modality,
            tasks={task.name: task},
            data=plan.data,
        )
        out, batches = predict(model, test, task, device=torch.device("cpu"))
        risks.append(out)
        times.append(torch.cat([b[label_key(task.name, "time")] for b in batches]).numpy())
        events.append(torch.cat([b[label_key(task.name, "event")] for b in batches]).numpy())
    c_fed = concordance_index(np.concatenate(times), np.concatenate(risks), np.concatenate(events))
    elapsed = time.perf_counter() - started
    # Reference: lifelines on the pooled training cases, scored on the same test cases
    frame = rossi.load_rossi()
    sites = rossi.site_assignment(frame, sites=4, by="age")
    held_out = rossi.held_out_rows(sites, test_fraction=0.25, seed=0)
    train, test_frame = frame[~held_out], frame[held_out]
    cox = lifelines.CoxPHFitter().fit(train, rossi.DURATION, rossi.EVENT)
    c_cox = lifelines.utils.concordance_index(
        test_frame[rossi.DURATION],
        -cox.predict_log_partial_hazard(test_frame[COVARIATES]),
        test_frame[rossi.EVENT],
    )
    stratified = lifelines.CoxPHFitter().fit(
        train.assign(site=sites[~held_out]), rossi.DURATION, rossi.EVENT, strata=["site"]
    )
    head = model.tasks[task.name]
    assert isinstance(head, SurvivalHead) and head.covariates is not None
    scale = np.array([task.covariate_scaling[c][1] for c in COVARIATES])
    beta = head.covariates.weight.detach().numpy()[0] / scale
    print(f"rossi: C-index federated {c_fed:.4f}, CoxPHFitter {c_cox:.4f}, {elapsed:.1f} s")
    # Assert: as good as the Cox regression, clearly better than chance, and the head's
    # log hazard ratios are the site-stratified Cox estimate (per-site risk sets)
    assert len(np.concatenate(risks)) == int(held_out.sum())
    assert abs(c_fed - c_cox) <= 0.01
    assert c_fed > 0.58
    np.testing.assert_allclose(beta, stratified.params_[COVARIATES].to_numpy(), atol=5e-3)
