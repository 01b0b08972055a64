"""The analytic (incremental ridge) segmentation head: exact under any split and over time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from unicon_model.analytic import (
    AnalyticSegmentationHead,
    RidgeStatistics,
    merge_statistics,
    segmentation_statistics,
    voxel_class_weights,
)
from unicon_model.errors import AnalyticHeadError, ComponentError, PlanError
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec, validate_plan

WIDTHS = [4, 8, 16]
LABELS = 3
PRIOR = 0.05


def pyramid(cases: int, seed: int, size: int = 8) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A 3-level feature pyramid whose finest level carries the label map, and the masks."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(cases, size, size, size, dtype=torch.long)
    for i in range(cases):
        label = 1 + i % (LABELS - 1)
        x0, y0, z0 = (int(v) for v in torch.randint(0, size - 3, (3,), generator=g))
        masks[i, x0 : x0 + 3, y0 : y0 + 3, z0 : z0 + 3] = label
    levels = []
    for level, width in enumerate(WIDTHS):
        edge = size // 2**level
        features = torch.randn(cases, width, edge, edge, edge, generator=g)
        if level == 0:
            features[:, :LABELS] += 4.0 * torch.nn.functional.one_hot(masks, LABELS).movedim(-1, 1)
        levels.append(features)
    return levels, masks


def head_statistics(
    head: AnalyticSegmentationHead, levels: list[torch.Tensor], masks: torch.Tensor
) -> RidgeStatistics:
    weights = voxel_class_weights(LABELS, PRIOR)
    return segmentation_statistics(head.voxel_features(levels), masks, weights)


def subset(levels: list[torch.Tensor], masks: torch.Tensor, index: list[int]) -> tuple:
    return [f[index] for f in levels], masks[index]


def sklearn_reference(
    head: AnalyticSegmentationHead, levels: list[torch.Tensor], masks: torch.Tensor, l2: float
) -> Ridge:
    """Weighted sklearn Ridge on every voxel of every case (the pooled, centralised fit)."""
    z = head.voxel_features(levels).double()
    x = z.movedim(1, -1).reshape(-1, z.shape[1]).numpy()
    labels = masks.reshape(-1).numpy()
    voxels = masks[0].numel()
    weights = voxel_class_weights(LABELS, PRIOR)[labels] / voxels
    return Ridge(alpha=l2).fit(x, np.eye(LABELS)[labels], sample_weight=weights)


@pytest.mark.parametrize("random_features", [0, 6])
@pytest.mark.parametrize("split", ["iid", "one-label-distribution-per-site"])
def test_federated_statistics_equal_pooled_weighted_ridge(split: str, random_features: int) -> None:
    # Prepare: 12 cases over three sites, IID or each site with its own label distribution
    torch.manual_seed(0)
    head = AnalyticSegmentationHead(3, WIDTHS, LABELS, random_features=random_features)
    levels, masks = pyramid(12, seed=1)
    if split == "iid":
        parts = [list(range(i, 12, 3)) for i in range(3)]
    else:  # site 0: label 1 only; site 1: label 2 only; site 2: both, and one empty case
        parts = [[0, 2, 4, 6], [1, 3, 5, 7], [8, 9, 10, 11]]
        masks[11] = 0
    # Execute
    federated = merge_statistics(head_statistics(head, *subset(levels, masks, p)) for p in parts)
    pooled = head_statistics(head, levels, masks)
    fed_solution = head.fit(federated, l2=0.5)
    pooled_solution = pooled.solution(l2=0.5, bias_column=True)
    # Assert: equal to each other, and to sklearn's weighted Ridge on the pooled voxels
    difference = np.abs(fed_solution.weight - pooled_solution.weight).max()
    assert difference <= 1e-4, difference
    reference = sklearn_reference(head, levels, masks, 0.5)
    np.testing.assert_allclose(fed_solution.weight, reference.coef_.T, atol=1e-6)
    np.testing.assert_allclose(fed_solution.bias, reference.intercept_, atol=1e-6)
    assert federated.count == pooled.count == 12 * 8**3
    assert 1 <= fed_solution.condition < 1e8
    # the head learned the labels: Dice of every label on the training cases is high
    prediction = head(levels).argmax(1)
    for label in (1, 2):
        overlap = ((prediction == label) & (masks == label)).sum()
        dice = 2 * overlap / ((prediction == label).sum() + (masks == label).sum())
        assert dice > 0.8, (label, float(dice))


def test_incremental_statistics_over_three_stages_equal_one_solve() -> None:
    # Prepare: one head, three chunks of cases arriving over time
    head = AnalyticSegmentationHead(3, WIDTHS, LABELS, random_features=4)
    levels, masks = pyramid(9, seed=2)
    chunks = [
        head_statistics(head, *subset(levels, masks, list(range(i, i + 3)))) for i in (0, 3, 6)
    ]
    everything = head_statistics(head, levels, masks).solution(l2=1.0, bias_column=True)
    # Execute: each stage adds its statistics to the ones stored with the head
    head.fit(chunks[0], l2=1.0)
    head.fit(chunks[1], l2=1.0, accumulate=True)
    last = head.fit(chunks[2], l2=1.0, accumulate=True)
    # Assert
    assert np.abs(last.weight - everything.weight).max() <= 1e-4
    assert np.abs(last.bias - everything.bias).max() <= 1e-4
    stored = head.stored_statistics()
    assert stored.count == 9 * 8**3
    np.testing.assert_allclose(stored.gram, merge_statistics(chunks).gram, rtol=1e-12)
    state = head.state_dict()
    assert {"stats_count", "stats_gram", "stats_cross", "projection"} <= set(state)
    assert state["stats_gram"].dtype == torch.float64


def test_a_label_without_voxels_gives_finite_weights_and_a_condition_number() -> None:
    # Prepare: no voxel of label 2 anywhere, and a feature that is always 0
    head = AnalyticSegmentationHead(3, WIDTHS, LABELS)
    levels, masks = pyramid(4, seed=3)
    masks[masks == 2] = 0
    levels[0][:, -1] = 0.0
    stats = head_statistics(head, levels, masks)
    assert stats.target_sum[2] == 0
    # Execute
    solution = head.fit(stats, l2=1e-3)
    # Assert: finite, label 2 never predicted, the condition number reported
    assert np.all(np.isfinite(solution.weight)) and np.all(np.isfinite(solution.bias))
    assert np.abs(solution.weight[:, 2]).max() < 1e-12
    assert np.isfinite(solution.condition) and solution.condition > 1
    assert (head(levels).argmax(1) == 2).sum() == 0
    with pytest.raises(AnalyticHeadError, match="no samples"):
        RidgeStatistics.zeros(29, 3).solution(l2=1.0, bias_column=True)


def test_class_weights_come_from_the_plan_and_balance_a_matching_prior() -> None:
    np.testing.assert_allclose(voxel_class_weights(3, 0.05), [0.5 / 0.95, 10.0, 10.0])
    np.testing.assert_allclose(voxel_class_weights(3, 0.05, class_balance=False), [1, 1, 1])
    # with 5 % foreground, background and foreground carry the same total weight
    masks = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    masks.view(-1)[:50] = 1
    stats = segmentation_statistics(
        torch.ones(1, 2, 10, 10, 10), masks, voxel_class_weights(2, 0.05)
    )
    assert stats.target_sum[0] == pytest.approx(stats.target_sum[1])
    assert stats.feature_sum[-1] == pytest.approx(1.0)  # Σw: a case weighs 1
    with pytest.raises(AnalyticHeadError, match=r"mask values must lie in 0..1"):
        segmentation_statistics(torch.ones(1, 2, 10, 10, 10), masks + 1, np.ones(2))


def test_the_model_builds_and_applies_an_analytic_segmentation_head() -> None:
    # Prepare
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8, 16)))
    task = TaskSpec(
        name="seg",
        kind="segmentation",
        labels=("background", "lesion"),
        head="analytic",
        analytic_random_features=5,
    )
    model.grow(StageSpec(name="s", add_modalities=[ModalitySpec(name="ct")], add_tasks=[task]))
    head = model.tasks["seg"]
    assert isinstance(head, AnalyticSegmentationHead)
    # Execute
    x = torch.randn(2, 1, 16, 16, 16)
    logits = model(x, modality="ct", task="seg")
    # Assert: per-voxel logits; the seeded random projection is the same in a rebuilt model
    assert logits.shape == (2, 2, 16, 16, 16)
    assert head.statistics_shape == (4 + 8 + 16 + 5 + 1, 2)
    again = UniconModel.from_config(model.config())
    torch.testing.assert_close(again.tasks["seg"].projection, head.projection)
    assert list(head.parameters()) == []


def test_the_schema_admits_analytic_segmentation_and_refuses_misplaced_settings() -> None:
    seg = {"name": "seg", "kind": "segmentation", "labels": ["bg", "x"], "head": "analytic"}
    TaskSpec.model_validate({**seg, "analytic_random_features": 8, "class_balance": False})
    with pytest.raises(ValueError, match="only for analytic segmentation heads"):
        TaskSpec(name="c", kind="classification", classes=("a", "b"), analytic_random_features=4)
    with pytest.raises(ValueError, match="`class_balance` is only for analytic segmentation"):
        TaskSpec(name="g", kind="segmentation", labels=("bg", "x"), class_balance=False)
    raw = {
        "name": "p",
        "model": {"spatial_dims": 3, "widths": [4, 8, 16]},
        "stages": [
            {"name": "a", "add_modalities": [{"name": "ct"}], "add_tasks": [seg], "rounds": 1},
            {
                "name": "b",
                "add_modalities": [{"name": "mr", "decoder_lora": {"seg": 2}}],
                "objectives": ["seg"],
            },
        ],
    }
    with pytest.raises(PlanError, match="task 'seg' has an analytic head"):
        validate_plan(raw)


def test_voxel_extras_are_the_context_mean_the_intensity_and_the_squares_by_hand() -> None:
    # Prepare: a 2-level pyramid (widths 1, 2) on a 4x4x4 patch and a 2-channel input
    head = AnalyticSegmentationHead(3, [1, 2], 2, extras=("squares", "intensity", "context"))
    g = torch.Generator().manual_seed(3)
    levels = [torch.randn(1, 1, 4, 4, 4, generator=g), torch.randn(1, 2, 2, 2, 2, generator=g)]
    image = torch.randn(1, 2, 4, 4, 4, generator=g)
    # Execute
    z = head.voxel_features(levels, image)
    # Assert: pyramid 3, context 3, intensity 2 (first channel and its mean): 8, squared: 16
    assert head.extras == ("context", "intensity", "squares")  # built in this order
    assert z.shape == (1, 16, 4, 4, 4) and head.statistics_shape == (17, 2)
    upsampled = torch.nn.functional.interpolate(levels[1], size=(4, 4, 4), mode="trilinear")
    torch.testing.assert_close(z[:, :3], torch.cat([levels[0], upsampled], dim=1))
    # the context mean at a corner voxel: the 2x2x2 block that exists, over 27 (zero padding)
    corner = float(z[0, 3, 0, 0, 0])
    assert corner == pytest.approx(float(levels[0][0, 0, :2, :2, :2].sum()) / 27, rel=1e-5)
    # at an inner voxel the full 3x3x3 neighbourhood of the input's first channel
    inner = float(z[0, 7, 1, 2, 1])
    assert inner == pytest.approx(float(image[0, 0, 0:3, 1:4, 0:3].mean()), rel=1e-5)
    torch.testing.assert_close(z[:, 6], image[:, 0])  # the first channel only
    torch.testing.assert_close(z[:, 8:], z[:, :8] ** 2)
    # Assert: the intensity extra needs the input, at the finest level's size
    with pytest.raises(ComponentError, match="`intensity` feature needs the route's input"):
        head.voxel_features(levels)
    with pytest.raises(ComponentError, match="unknown voxel features"):
        AnalyticSegmentationHead(3, [1, 2], 2, extras=("edges",))


def test_a_model_feeds_its_input_to_an_intensity_head_and_the_schema_checks_the_extras() -> None:
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8, 16)))
    task = TaskSpec(
        name="seg",
        kind="segmentation",
        labels=("background", "lesion"),
        head="analytic",
        analytic_features=("intensity", "squares"),
    )
    model.grow(StageSpec(name="s", add_modalities=[ModalitySpec(name="ct")], add_tasks=[task]))
    head = model.tasks["seg"]
    assert isinstance(head, AnalyticSegmentationHead)
    with torch.no_grad():
        head.weight.normal_()
    x = torch.randn(2, 1, 16, 16, 16)
    # Execute
    logits = model(x, modality="ct", task="seg")
    # Assert: the model's logits are the head's on the pyramid and that very input
    assert head.statistics_shape == (2 * (4 + 8 + 16 + 2) + 1, 2)
    expected = head(model.encode(x, modality="ct", task="seg"), None, x)
    torch.testing.assert_close(logits, expected)
    again = UniconModel.from_config(model.config())
    assert again.tasks["seg"].extras == ("intensity", "squares")
    # Assert: the schema refuses extras off an analytic segmentation head, and repeats
    with pytest.raises(ValueError, match="`analytic_features` is only for analytic segmentation"):
        TaskSpec(name="g", kind="segmentation", labels=("bg", "x"), analytic_features=("squares",))
    with pytest.raises(ValueError, match="lists \\['squares'\\] more than once"):
        TaskSpec.model_validate({**task.model_dump(), "analytic_features": ["squares", "squares"]})
    assert "analytic_features" not in TaskSpec(name="t", kind="segmentation",
                                               labels=("bg", "x")).model_dump()  # fmt: skip
