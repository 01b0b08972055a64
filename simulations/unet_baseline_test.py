"""The ``unet`` baseline: a MONAI BasicUNet trained centrally per segmentation route."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import simulations.baselines as baselines
from simulations.synthetic import make_sites
from simulations.unet_baseline import (
    Cases,
    UNetBaselineError,
    UNetSettings,
    predict_labels,
    run_unet,
    score,
    segmentation_routes,
    train_unet,
)
from tests.conftest import tiny_plan
from unicon_model.metrics.segmentation import mean_dice
from unicon_model.schema import validate_plan


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these tiny networks run faster without thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _squares(n: int, seed: int) -> Cases:
    """2D 16² images whose mask is a bright 6x6 square at a random place."""
    generator = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for _ in range(n):
        mask = torch.zeros(16, 16, dtype=torch.long)
        y, x = torch.randint(2, 9, (2,), generator=generator).tolist()
        mask[y : y + 6, x : x + 6] = 1
        images.append(0.2 * torch.rand(1, 16, 16, generator=generator) + 0.7 * mask[None])
        masks.append(mask)
    return Cases(torch.stack(images), torch.stack(masks), ["a"] * n)


def test_unet_learns_a_separable_problem_and_is_scored_with_the_sites_metric() -> None:
    train, test = _squares(8, seed=0), _squares(4, seed=1)
    settings = UNetSettings(epochs=5, lr=1e-2, batch_size=4)
    model = train_unet(train, num_labels=2, spatial_dims=2, settings=settings, seed=0)
    dice = score(model, test, num_labels=2)
    assert dice > 0.8
    expected = mean_dice(predict_labels(model, test.images), test.masks, num_labels=2)
    assert dice == expected
    short = UNetSettings(epochs=1)
    first, second = (
        train_unet(train, num_labels=2, spatial_dims=2, settings=short, seed=1).state_dict()
        for _ in range(2)
    )
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded
    with pytest.raises(UNetBaselineError, match="no training case"):
        train_unet(
            Cases(torch.empty(0), torch.empty(0, dtype=torch.long)), num_labels=2, spatial_dims=2
        )


def test_routes_are_the_segmentation_task_on_each_modality_it_trains_on() -> None:
    routes = segmentation_routes(validate_plan(tiny_plan()))
    assert [(r.column, r.modality.input_keys, r.stage) for r in routes] == [
        ("lesion-seg@ct", ("ct",), 2),
        ("lesion-seg@pet", ("ct", "pet"), 3),
    ]


def test_unet_baseline_reports_one_column_per_segmentation_route(tmp_path: Path) -> None:
    manifests = make_sites(
        tmp_path / "sites", sites=2, seed=3, size=16, cases_per_site=6, pet_sites=1
    )
    sites = [p.parent for p in manifests]
    settings = UNetSettings(epochs=1, eval_every=1)
    result = run_unet(tiny_plan(), sites, tmp_path / "work", lambda: 1.5, settings)
    assert result.name == "unet"
    assert result.stages == ["foundation", "prognosis", "segmentation", "pet"]
    assert result.tasks == ["lesion-seg@ct", "lesion-seg@pet"]
    finite = [[math.isfinite(v) for v in row] for row in result.R]
    assert finite == [[False, False], [False, False], [True, False], [True, True]]
    assert all(0.0 <= v <= 1.0 for row in result.R for v in row if math.isfinite(v))
    assert result.bwt == 0.0 and result.wall_s == 1.5
    assert len(result.bytes_up) == 2 and sum(result.bytes_up.values()) == 0
    assert [r["task"] for r in result.rounds] == ["lesion-seg@ct", "lesion-seg@pet"]
    assert all(r["train_cases"] > 0 and r["seconds"] >= 0 for r in result.rounds)
    assert result.R_per_site and all(len(rows) == 4 for rows in result.R_per_site.values())


def test_run_baseline_dispatches_unet_and_single_task(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(baselines, "run_unet", lambda *a: calls.append("unet"))
    monkeypatch.setattr(baselines, "run_single_task", lambda *a: calls.append("single-task"))
    for method in ("unet", "single-task"):
        baselines.run_baseline(method, tiny_plan(), [], Path("."), lambda: 0.0)
    assert calls == ["unet", "single-task"]


def test_unet_baseline_refuses_a_plan_without_segmentation(tmp_path: Path) -> None:
    plan = tiny_plan(stages=tiny_plan()["stages"][:2])
    with pytest.raises(UNetBaselineError, match="trains no segmentation task"):
        run_unet(plan, [], tmp_path, lambda: 0.0)
