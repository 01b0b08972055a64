"""Segmentation head: the output bias starts at the plan's foreground prior."""

from __future__ import annotations

import math

import pytest
import torch

from unicon_model.heads import SegmentationHead


def test_a_new_segmentation_head_predicts_the_prior_odds_not_foreground_everywhere() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(3, [4, 8, 16], 3, norm="group", foreground_prior=0.01)
    # background 0, each of the two labels log(0.005 / 0.99)
    expected = math.log(0.01 / (2 * 0.99))
    assert head.out.bias is not None
    assert head.out.bias.tolist() == pytest.approx([0.0, expected, expected])
    features = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 8, 4, 4, 4), torch.randn(2, 16, 2, 2, 2)]
    with torch.no_grad():
        probabilities = head(features).softmax(1)
    # argmax is background nearly everywhere, and the mean foreground mass is near the prior
    assert (probabilities.argmax(1) > 0).float().mean() < 0.01
    assert 0.002 < float(probabilities[:, 1:].sum(1).mean()) < 0.05


def test_the_prior_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="foreground_prior"):
        SegmentationHead(3, [4, 8], 2, norm="group", foreground_prior=1.0)


def test_a_light_decoder_projects_every_level_to_its_width_and_is_a_fraction_of_the_size() -> None:
    # Prepare: the default model's widths, a full and a light decoder
    widths = [8, 16, 32]
    torch.manual_seed(0)
    full = SegmentationHead(3, widths, 2, norm="group")
    light = SegmentationHead(3, widths, 2, norm="group", decoder_width=8)
    features = [torch.randn(2, w, e, e, e) for w, e in zip(widths, (16, 8, 4), strict=True)]
    # Execute
    out = light(features)
    # Assert: same output shape; every level projected to 8 channels by a 1x1 convolution
    assert out.shape == full(features).shape == (2, 2, 16, 16, 16)
    assert light.lateral is not None and full.lateral is None
    assert [(c.in_channels, c.out_channels) for c in light.lateral] == [(8, 8), (16, 8), (32, 8)]
    assert [c.in_channels for c in light.adaptable_convolutions()] == [16, 16, 8]
    # hand count: laterals (8+16+32)*8 + 3*8; blocks 2 * (16*8*27 + 8) + GroupNorm 2 * 16;
    # output 8*2 + 2
    expected = (56 * 8 + 24) + 2 * (16 * 8 * 27 + 8) + 2 * 16 + (8 * 2 + 2)
    assert sum(p.numel() for p in light.parameters()) == expected
    assert expected < 0.3 * sum(p.numel() for p in full.parameters())


def test_a_light_decoder_takes_prompts_and_decoder_deltas() -> None:
    from unicon_model.model import UniconModel
    from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec

    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8, 16)))
    seg = TaskSpec(
        name="seg", kind="segmentation", labels=("bg", "x"), decoder_width=6, prompt="box"
    )
    model.grow(StageSpec(name="a", add_modalities=[ModalitySpec(name="ct")], add_tasks=[seg]))
    pet = ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct", decoder_lora={"seg": 2})
    model.grow(StageSpec(name="b", add_modalities=[pet], objectives=["seg"]))
    box = torch.zeros(2, 1, 16, 16, 16)
    box[:, :, 4:10, 4:10, 4:10] = 1
    with torch.no_grad():
        ct = model(torch.randn(2, 1, 16, 16, 16), modality="ct", task="seg", prompt=box)
        both = torch.randn(2, 2, 16, 16, 16)
        # decoder deltas start at zero: the PET route equals the CT route on the CT channel
        same = model(both, modality="pet", task="seg", prompt=box)
        again = model(both[:, :1], modality="ct", task="seg", prompt=box)
    assert ct.shape == same.shape == (2, 2, 16, 16, 16)
    torch.testing.assert_close(same, again)
    plain = TaskSpec(name="s", kind="segmentation", labels=("a", "b"))
    assert "decoder_width" not in plain.model_dump()
    with pytest.raises(ValueError, match="`decoder_width` is only for neural segmentation"):
        TaskSpec(name="c", kind="classification", classes=("a", "b"), decoder_width=8)
    with pytest.raises(ValueError, match="`decoder_width` is only for neural segmentation"):
        TaskSpec(name="s", kind="segmentation", labels=("a", "b"), head="analytic", decoder_width=8)
