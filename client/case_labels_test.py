"""Mask labels matched to plan labels by name, so label extensions read earlier masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.case_labels import encode_labels, label_key, mask_lookup
from client.errors import DataError
from client.manifest import Case
from unicon_model.schema import TaskSpec

ORGANS = TaskSpec(name="organ-seg", kind="segmentation", labels=("background", "liver", "lungs"))
SPINE = TaskSpec(
    name="organ-spine", kind="segmentation", labels=("background", "spine"), extends="organ-seg"
)
SITE_LABELS = ("background", "liver", "lungs", "spine")
"""What the site's manifest declares for organ-seg, in mask-value order."""


def lookup_list(spec: TaskSpec, declared: tuple[str, ...] | None) -> list[int] | None:
    lookup = mask_lookup(spec, declared)
    return None if lookup is None else lookup.tolist()


def test_the_plan_labels_as_declared_need_no_lookup() -> None:
    assert mask_lookup(ORGANS, ("background", "liver", "lungs")) is None
    assert mask_lookup(SPINE, ("background", "spine")) is None


def test_labels_the_plan_does_not_learn_yet_are_background() -> None:
    assert lookup_list(ORGANS, SITE_LABELS) == [0, 1, 2, 0]


def test_labels_are_matched_by_name_whatever_their_order() -> None:
    # the site's mask values: 1 lungs, 2 spine, 3 liver
    assert lookup_list(ORGANS, ("background", "lungs", "spine", "liver")) == [0, 2, 0, 1]


def test_an_extension_reads_its_new_labels_from_the_base_masks() -> None:
    assert lookup_list(SPINE, SITE_LABELS) == [0, 0, 0, 1]
    assert lookup_list(SPINE, ("background", "spine", "liver", "lungs")) == [0, 1, 0, 0]


@pytest.mark.parametrize("declared", [("background", "liver", "lungs"), ("background", "x"), None])
def test_an_extension_whose_labels_the_manifest_lacks_is_refused_with_the_fix(
    declared: tuple[str, ...] | None,
) -> None:
    # an extension matches by name only, even with as many labels as it has
    with pytest.raises(DataError) as caught:
        mask_lookup(SPINE, declared)
    text = str(caught.value)
    assert "'organ-spine' needs labels ['spine'] of task 'organ-seg'" in text
    assert f"declares {list(declared or [])} for it" in text
    assert "tasks.organ-seg.labels" in text


def test_a_base_task_with_labels_named_otherwise_reads_mask_values_as_they_are() -> None:
    tumour = TaskSpec(name="seg", kind="segmentation", labels=("background", "tumour"))
    assert mask_lookup(tumour, ("background", "foreground")) is None
    assert mask_lookup(tumour, None) is None
    with pytest.raises(DataError, match=r"needs labels \['tumour'\] of task 'seg'"):
        mask_lookup(tumour, ("background", "foreground", "edge"))


def test_a_base_task_some_of_whose_labels_match_by_name_needs_all_of_them() -> None:
    # as many labels, but only 'lungs' is named alike: reading values as indices would
    # train lungs as liver and kidney as lungs
    with pytest.raises(DataError, match=r"'organ-seg' needs labels \['liver'\]"):
        mask_lookup(ORGANS, ("background", "lungs", "kidney"))


# ---------------------------------------------------------------- encode_labels


def organ_case() -> tuple[Case, dict[str, np.ndarray]]:
    """A 1×2×3 case whose mask holds each of the site's labels (values 0..3)."""
    case = Case(id="c1", images={"ct": "c1.nii.gz"}, labels={"organ-seg": "c1-organs.nii.gz"})
    mask = np.array([[[0, 1, 2], [3, 3, 1]]], dtype=np.float32)
    image = np.zeros((1, 1, 2, 3), dtype=np.float32)
    # the data pipeline reads organ-seg's mask for both tasks (one array per plan task)
    arrays = {"ct": image, "organ-seg": mask[None], "organ-spine": mask[None].copy()}
    return case, arrays


def test_encode_labels_maps_the_declared_mask_values_to_each_task() -> None:
    # Prepare
    case, arrays = organ_case()
    tasks = {"organ-seg": ORGANS, "organ-spine": SPINE}
    # Execute
    sample = encode_labels(case, tasks, arrays, {"organ-seg": SITE_LABELS})
    # Assert: the spine (3) is background for organ-seg and label 1 for the extension
    organs, spine = sample[label_key("organ-seg", "mask")], sample[label_key("organ-spine", "mask")]
    assert organs.dtype == spine.dtype == torch.int64
    assert organs.tolist() == [[[0, 1, 2], [0, 0, 1]]]
    assert spine.tolist() == [[[0, 0, 0], [1, 1, 0]]]
    assert bool(sample[label_key("organ-seg", "has")])
    assert bool(sample[label_key("organ-spine", "has")])


def test_encode_labels_refuses_mask_values_beyond_the_declared_labels() -> None:
    # Prepare: value 3 (the spine) with a manifest declaring only three labels
    case, arrays = organ_case()
    declared = {"organ-seg": ("background", "liver", "lungs")}
    # Execute / Assert: the base task has no lookup, the value is out of range
    with pytest.raises(DataError, match=r"mask of task 'organ-seg' has values outside 0\.\.2"):
        encode_labels(case, {"organ-seg": ORGANS}, arrays, declared)
    # the extension needs the spine declared
    with pytest.raises(DataError, match=r"needs labels \['spine'\]"):
        encode_labels(case, {"organ-spine": SPINE}, arrays, declared)


def test_encode_labels_without_declared_labels_keeps_mask_values() -> None:
    # Prepare: a mask with values 0..2 only
    case, arrays = organ_case()
    arrays["organ-seg"] = np.array([[[[0, 1, 2], [2, 0, 1]]]], dtype=np.float32)
    # Execute
    sample = encode_labels(case, {"organ-seg": ORGANS}, arrays)
    # Assert
    assert sample[label_key("organ-seg", "mask")].tolist() == [[[0, 1, 2], [2, 0, 1]]]
