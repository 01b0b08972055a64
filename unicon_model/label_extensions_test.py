"""Label extensions: the merged label map, its labels, and the base task left untouched."""

from __future__ import annotations

import pytest
import torch

from unicon_model.label_extensions import (
    extensions_of,
    merge_label_maps,
    merged_labels,
    predict_label_map,
)
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec

BASE = TaskSpec(
    name="organ-seg",
    kind="segmentation",
    labels=("background", "liver", "lungs"),
    foreground_prior=0.5,
)
SPINE = TaskSpec(
    name="organ-spine",
    kind="segmentation",
    labels=("background", "spine"),
    extends="organ-seg",
    lora_rank=2,
    foreground_prior=0.5,
)
KIDNEYS = TaskSpec(
    name="organ-kidney",
    kind="segmentation",
    labels=("background", "kidney-l", "kidney-r"),
    extends="organ-seg",
    foreground_prior=0.5,
)


def tiny_model() -> UniconModel:
    """A 2-level 3-D model grown with the CT route and the base segmentation task."""
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8), adapter_rank=2, head_hidden=8))
    model.grow(
        StageSpec(name="organs", add_modalities=(ModalitySpec(name="ct"),), add_tasks=(BASE,))
    )
    return model.eval()


def zero_head_biases(model: UniconModel) -> None:
    """Drop the foreground-prior biases, so every head's argmax gives each of its labels."""
    with torch.no_grad():
        for name, parameter in model.tasks.named_parameters():
            if name.endswith(".out.bias"):
                parameter.zero_()


# ---------------------------------------------------------------- merge_label_maps


def test_merge_label_maps_offsets_each_extension_and_keeps_the_base_labels() -> None:
    # Prepare: base (background, liver, lungs); extension 1 (background, a, b) at offset 3;
    # extension 2 (background, c) at offset 3 + 2 = 5
    base = torch.tensor([[0, 1, 0, 2, 0, 0, 0, 2]])
    first = torch.tensor([[1, 2, 0, 1, 2, 0, 0, 0]])
    second = torch.tensor([[1, 1, 1, 1, 0, 1, 0, 1]])
    untouched = base.clone()
    # Execute
    merged = merge_label_maps(base, [(first, 3), (second, 2)], 3)
    # Assert: voxel 0: base background, first says 1 -> 3 (the second's 1 comes too late);
    # 1, 3, 7: the base's labels stay; 2, 5: only the second claims them -> 5; 4: 2 -> 4
    assert merged.tolist() == [[3, 1, 5, 2, 4, 5, 0, 2]]
    assert merged.dtype == base.dtype
    assert torch.equal(base, untouched)  # the input map is not written


def test_merge_label_maps_keeps_the_base_dtype_and_without_extensions_is_the_base() -> None:
    # Prepare
    base = torch.tensor([0, 2, 1, 0], dtype=torch.uint8)
    extension = torch.tensor([1, 1, 1, 0])  # int64, as an argmax gives it
    # Execute
    merged = merge_label_maps(base, [(extension, 2)], 3)
    alone = merge_label_maps(base, [], 3)
    # Assert
    assert merged.dtype == torch.uint8 and merged.tolist() == [3, 2, 1, 0]
    assert torch.equal(alone, base)


def test_merge_label_maps_refuses_an_extension_map_of_another_shape() -> None:
    base = torch.zeros(2, 4, 4, dtype=torch.long)
    fits, narrower = torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 3\) for a base map of shape \(2, 4, 4\)"):
        merge_label_maps(base, [(fits, 2), (narrower, 2)], 3)


# ---------------------------------------------------------------- on a model


def test_extensions_and_merged_labels_follow_the_order_they_were_added() -> None:
    # Prepare
    model = tiny_model()
    before = merged_labels(model.task_specs, "organ-seg")
    # Execute
    model.grow(StageSpec(name="spine", add_tasks=(SPINE,)))
    model.grow(StageSpec(name="kidneys", add_tasks=(KIDNEYS,)))
    # Assert
    specs = model.task_specs
    assert before == ("background", "liver", "lungs")
    assert extensions_of(specs, "organ-seg") == [SPINE, KIDNEYS]
    assert extensions_of(specs, "organ-spine") == []
    merged = ("background", "liver", "lungs", "spine", "kidney-l", "kidney-r")
    assert merged_labels(specs, "organ-seg") == merged
    assert merged_labels(specs, "organ-spine") == ("background", "spine")


def test_predict_label_map_merges_the_argmaxes_of_the_base_and_its_extensions() -> None:
    # Prepare
    model = tiny_model()
    model.grow(StageSpec(name="more", add_tasks=(SPINE, KIDNEYS)))
    zero_head_biases(model)
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    # Execute
    with torch.no_grad():
        merged = predict_label_map(model, x, modality="ct", task="organ-seg")
        base, spine, kidneys = (
            model(x, modality="ct", task=t.name).argmax(1) for t in (BASE, SPINE, KIDNEYS)
        )
        alone = predict_label_map(model, x, modality="ct", task="organ-spine")
    # Assert: every head gives each of its labels somewhere, so the merge is exercised
    assert [len(t.unique()) for t in (base, spine, kidneys)] == [3, 2, 3]
    expected = merge_label_maps(base, [(spine, 2), (kidneys, 3)], 3)
    assert merged.shape == (2, 8, 8, 8) and torch.equal(merged, expected)
    # Assert: the base's labelled voxels keep their labels; the spine (3) takes the
    # background the base leaves it, the kidneys (4, 5) what both leave
    assert torch.equal(merged[base > 0], base[base > 0])
    assert int((merged == 3).sum()) == int(((base == 0) & (spine == 1)).sum())
    for label, value in ((4, 1), (5, 2)):
        left = (base == 0) & (spine == 0) & (kidneys == value)
        assert int((merged == label).sum()) == int(left.sum()) > 0
    # Assert: a task without extensions gives its own argmax
    assert torch.equal(alone, spine)


def test_growing_an_extension_leaves_the_base_logits_bit_identical() -> None:
    # Prepare: the base task's logits and weights before the extension exists
    model = tiny_model()
    zero_head_biases(model)
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x, modality="ct", task="organ-seg")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute: add the extension (with encoder deltas) and give all its weights random
    # values, as training might, so its route really differs from the base's
    model.grow(StageSpec(name="spine", add_tasks=(SPINE,)))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        spine_before = model(x, modality="ct", task="organ-spine")
        for parameter in model.tasks["organ-spine"].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        after = model(x, modality="ct", task="organ-seg")
        spine_after = model(x, modality="ct", task="organ-spine")
    # Assert: the extension changed, the base did not, to the bit
    assert not torch.equal(spine_after, spine_before)
    assert torch.equal(after, before)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    added = set(state) - set(weights)
    assert added and all(k.startswith("tasks.organ-spine.") for k in added)
