"""Box geometry of :mod:`unicon_model.prompts` against hand-computed boxes and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unicon_model.prompts import (
    BoxError,
    box_mask,
    centres_in,
    check_box,
    check_inside,
    jitter_boxes,
    label_boxes,
    label_prompt,
    map_region,
    parse_box,
    region_voxels,
    training_prompt,
    voxel_region,
)


def test_label_boxes_are_the_inclusive_foreground_bounds() -> None:
    masks = torch.zeros(3, 6, 5, dtype=torch.long)
    masks[0, 1:4, 2] = 1  # x 1..3, y 2..2
    masks[0, 5, 4] = 2  # a second label widens it to x 1..5, y 2..4
    masks[2, 0, 0] = 1  # one voxel at the corner
    boxes, present = label_boxes(masks)
    assert present.tolist() == [True, False, True]
    assert boxes[0].tolist() == [[1, 5], [2, 4]]
    assert boxes[1].tolist() == [[0, 0], [0, 0]]
    assert boxes[2].tolist() == [[0, 0], [0, 0]]


def test_label_boxes_in_3d() -> None:
    masks = torch.zeros(1, 4, 5, 6, dtype=torch.long)
    masks[0, 2, 1:3, 3:6] = 1
    boxes, present = label_boxes(masks)
    assert present.tolist() == [True]
    assert boxes[0].tolist() == [[2, 2], [1, 2], [3, 5]]


def test_box_mask_is_one_inside_and_the_whole_image_without_a_box() -> None:
    boxes = torch.tensor([[[1, 2], [0, 1]], [[0, 0], [0, 0]]])
    mask = box_mask(boxes, torch.tensor([True, False]), (4, 3))
    assert mask.shape == (2, 1, 4, 3)
    expected = torch.zeros(4, 3)
    expected[1:3, 0:2] = 1
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0], torch.ones(4, 3))


def test_label_prompt_is_the_label_box_and_whole_image_for_an_empty_label() -> None:
    masks = torch.zeros(2, 5, 5, dtype=torch.long)
    masks[0, 1, 3] = 1
    masks[0, 2, 1] = 1
    prompt = label_prompt(masks)
    expected = torch.zeros(5, 5)
    expected[1:3, 1:4] = 1
    assert torch.equal(prompt[0, 0], expected)
    assert torch.equal(prompt[1, 0], torch.ones(5, 5))
    assert torch.equal(label_prompt(masks, torch.tensor([False, True])), torch.ones(2, 1, 5, 5))


def test_jitter_moves_each_face_by_at_most_the_fraction_of_the_size() -> None:
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[[10, 19], [4, 4]]]).repeat(200, 1, 1)  # sizes 10 and 1
    moved = jitter_boxes(boxes, (40, 9), 0.2, generator)
    shift = (moved - boxes).abs()
    assert int(shift[:, 0].max()) == 2  # floor(0.2 * 10) reached
    assert int(shift[:, 1].max()) == 0  # floor(0.2 * 1) = 0: a one-voxel box stays
    assert set((moved[:, 0, 0] - 10).tolist()) == {-2, -1, 0, 1, 2}
    assert bool((moved[..., 0] <= moved[..., 1]).all())


def test_jitter_clips_to_the_image_and_keeps_a_voxel() -> None:
    generator = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[[0, 1], [8, 9]]]).repeat(100, 1, 1)
    moved = jitter_boxes(boxes, (10, 10), 0.5, generator)
    assert int(moved.min()) >= 0 and int(moved.max()) <= 9
    assert bool((moved[..., 0] <= moved[..., 1]).all())
    assert torch.equal(jitter_boxes(boxes, (10, 10), 0.0, generator), boxes)


def test_training_prompt_repeats_under_a_seed_and_drops_at_the_rate() -> None:
    masks = torch.zeros(400, 8, 8, dtype=torch.long)
    masks[:, 2:5, 3:6] = 1
    labelled = torch.ones(400, dtype=torch.bool)
    first = training_prompt(
        masks, labelled, jitter=0.0, drop=0.25, generator=torch.Generator().manual_seed(5)
    )
    again = training_prompt(
        masks, labelled, jitter=0.0, drop=0.25, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first, again)
    whole = first.flatten(1).all(dim=1)
    assert 0.18 < float(whole.float().mean()) < 0.32
    assert torch.equal(first[~whole][0, 0], label_prompt(masks[:1])[0, 0])
    none = training_prompt(
        masks, labelled, jitter=0.0, drop=1.0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(none, torch.ones_like(none))


def test_parse_box_reads_corners_per_axis() -> None:
    assert parse_box("1,2,3,4,5,6", 3).tolist() == [[1, 4], [2, 5], [3, 6]]
    assert parse_box(" 0.5, 1 ,2,3", 2).tolist() == [[0.5, 2], [1, 3]]
    for bad in ("1,2,3", "a,b,c,d,e,f", "1,2,3,4,5,nan", ""):
        with pytest.raises(BoxError, match=r"expected 6 finite numbers x0,y0,z0,x1,y1,z1"):
            parse_box(bad, 3)


def test_check_box_names_the_reversed_or_empty_axis_and_the_shape() -> None:
    with pytest.raises(BoxError, match=r"box B: y0 = 5 > y1 = 3 on axis 1 \(y\).*\(8, 9, 10\)"):
        check_box(np.array([[0, 1], [5, 3], [0, 1]]), (8, 9, 10), shown="B")
    check_box(np.array([[2, 2]]), (4,), shown="B")  # one slice of voxels: fine
    with pytest.raises(BoxError, match=r"x0 = 2 == x1 = 2 on axis 0 \(x\), so the box is empty"):
        check_box(np.array([[2.0, 2.0]]), (4,), shown="B", world=True)


def test_check_inside_refuses_a_box_outside_the_image() -> None:
    check_inside(voxel_region(np.array([[0, 7], [0, 8]])), (8, 9), shown="B")
    with pytest.raises(
        BoxError, match=r"axis 1 \(y\) spans voxels 2\.\.9, outside the image's 0\.\.8"
    ):
        check_inside(voxel_region(np.array([[0, 7], [2, 9]])), (8, 9), shown="B")
    with pytest.raises(BoxError, match=r"axis 0 \(x\) spans voxels -1\.\.3.*image shape \(8, 9\)"):
        check_inside(voxel_region(np.array([[-1, 3], [2, 3]])), (8, 9), shown="B")


def test_map_region_through_scaling_and_a_flip() -> None:
    # image: 2 mm voxels from x = 10 mm; patch: 1 mm voxels, axis flipped, from x = 30 mm
    image = np.array([[2.0, 0, 10.0], [0, 1.0, 0], [0, 0, 1]])
    patch = np.array([[-1.0, 0, 30.0], [0, 1.0, 0], [0, 0, 1]])
    region = voxel_region(np.array([[1, 2], [0, 0]]))  # x voxels 1..2 -> 11..15 mm
    mapped = map_region(region, image, patch)
    assert mapped.tolist() == [[15.0, 19.0], [-0.5, 0.5]]  # 30 - 15 .. 30 - 11
    # voxel centres exactly on the border (15, 19) are left out, as MONAI's nearest does
    assert region_voxels(mapped, (32, 4), shown="B").tolist() == [[16, 18], [0, 0]]


def test_region_voxels_keeps_a_thin_region_and_refuses_one_cropped_away() -> None:
    assert region_voxels(np.array([[2.2, 2.4]]), (8,), shown="B").tolist() == [[2, 2]]
    assert region_voxels(np.array([[-3.0, 2.5]]), (8,), shown="B").tolist() == [[0, 2]]
    with pytest.raises(BoxError, match=r"outside the model's input patch \(8,\) on axis 0"):
        region_voxels(np.array([[9.0, 12.0]]), (8,), shown="B")


def test_centres_in_keeps_border_centres_of_a_world_box() -> None:
    # 0.5 mm voxels centred at 100 + 0.5 i mm: 102.5..104.5 mm holds the centres of 5..9
    affine = np.array([[0.5, 0, 100.0], [0, 1.0, 0], [0, 0, 1]])
    world = map_region(np.array([[102.5, 104.5], [0.2, 3.0]]), np.eye(3), affine)
    assert world.tolist() == [[5.0, 9.0], [0.2, 3.0]]
    assert centres_in(world, shown="B").tolist() == [[5, 9], [1, 3]]
    with pytest.raises(BoxError, match=r"box B holds no voxel centre on axis 1 \(y\)"):
        centres_in(np.array([[5.0, 9.0], [0.2, 0.8]]), shown="B")
