"""Masked-volume reconstruction: the hidden blocks, the loss, the metric, DP-SGD."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from torch import Tensor, nn

from client.self_supervised import (
    EVALUATION_SEED,
    block_mask,
    masked_errors,
    reconstruction_metrics,
    task_mask,
)
from unicon_model.components import set_trainable
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec

RECON = TaskSpec(name="masked", kind="reconstruction", mask_ratio=0.5, mask_size=4)


def _model() -> UniconModel:
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8), adapter_rank=2, head_hidden=4))
    model.grow(StageSpec(name="s", add_modalities=(ModalitySpec(name="ct"),), add_tasks=(RECON,)))
    return model


class _Constant(nn.Module):
    """Predicts 0.5 everywhere and remembers what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Tensor | None = None

    def forward(self, x: Tensor, *, modality: str, task: str) -> Tensor:
        self.seen = x.clone()
        return torch.full_like(x[:, :1], 0.5)


def test_block_mask_hides_exactly_the_ratio_of_whole_blocks() -> None:
    # Execute: 8³ patches in blocks of 4: 8 blocks, half hidden
    mask = block_mask(3, (8, 8, 8), ratio=0.5, size=4, generator=torch.Generator().manual_seed(1))
    # Assert: 4 whole blocks of 64 voxels per sample, and the samples differ
    assert mask.shape == (3, 1, 8, 8, 8) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [256, 256, 256]
    blocks = mask.view(3, 2, 4, 2, 4, 2, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 8, 64)
    assert bool(((blocks.sum(2) == 0) | (blocks.sum(2) == 64)).all())
    assert not torch.equal(mask[0], mask[1])


def test_block_mask_refuses_blocks_that_do_not_tile_the_patch() -> None:
    with pytest.raises(ValueError, match="mask_size 3 does not divide the patch size"):
        block_mask(1, (8, 8), ratio=0.5, size=3)


def test_masked_errors_are_the_hand_computed_mse_on_the_hidden_voxels_only() -> None:
    # Prepare: two channels (ct, pet), reconstruct the first
    task = RECON.model_copy(update={"channels": 1})
    image = torch.rand(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = block_mask(2, (8, 8, 8), ratio=0.5, size=4, generator=torch.Generator().manual_seed(4))
    stub = _Constant()
    # Execute
    errors = masked_errors(stub, image, task, modality="pet", mask=mask)
    # Assert: hidden CT voxels were zeroed, visible ones and PET passed as they are
    assert stub.seen is not None
    seen_ct, ct = stub.seen[:, 0], image[:, 0]
    hidden = mask[:, 0]
    assert bool((seen_ct[hidden] == 0).all())
    assert torch.equal(seen_ct[~hidden], ct[~hidden])
    assert torch.equal(stub.seen[:, 1], image[:, 1])
    for i in range(2):
        expected = float(((0.5 - ct[i][hidden[i]]) ** 2).mean())
        assert float(errors[i]) == pytest.approx(expected, rel=1e-6)


def test_more_channels_than_the_route_has_is_a_clear_error() -> None:
    task = RECON.model_copy(update={"channels": 2})
    image = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="reconstructs 2 channel\\(s\\), but modality 'ct' has 1"):
        masked_errors(_Constant(), image, task, modality="ct", mask=task_mask(image, task))


def test_reconstruction_metrics_are_reproducible_and_psnr_follows_the_mse() -> None:
    # Prepare: 5 cases in batches of 2 (so the per-batch seeds are exercised)
    model = _model()
    cases = [{"image": torch.rand(1, 8, 8, 8)} for _ in range(5)]
    # Execute
    first = reconstruction_metrics(
        model, cases, RECON, modality="ct", device=torch.device("cpu"), batch_size=2
    )
    again = reconstruction_metrics(
        model, cases, RECON, modality="ct", device=torch.device("cpu"), batch_size=2
    )
    # Assert
    assert first == again
    assert first["masked/n"] == 5
    assert first["masked/psnr"] == pytest.approx(10 * math.log10(1 / first["masked/mse"]))
    # the MSE is the mean of the per-case errors under the documented seeds
    errors = []
    for start in (0, 2, 4):
        image = torch.stack([c["image"] for c in cases[start : start + 2]])
        mask = task_mask(
            image, RECON, generator=torch.Generator().manual_seed(EVALUATION_SEED + start)
        )
        with torch.no_grad():
            errors.append(masked_errors(model.eval(), image, RECON, modality="ct", mask=mask))
    assert first["masked/mse"] == pytest.approx(float(torch.cat(errors).double().mean()))


def test_opacus_per_sample_gradients_of_the_reconstruction_equal_a_per_sample_loop() -> None:
    # Prepare: the stage trains the backbone, the CT stem and the decoder, in float64
    model = _model()
    trainable = set_trainable(model, ["backbone", "modality/ct", "task/masked"])
    model.double()
    image = torch.rand(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    mask = block_mask(3, (8, 8, 8), ratio=0.5, size=4, generator=torch.Generator().manual_seed(6))
    reference = copy.deepcopy(model)
    loop: dict[str, list[Tensor]] = {name: [] for name in trainable}
    for i in range(3):
        reference.zero_grad()
        masked_errors(
            reference, image[i : i + 1], RECON, modality="ct", mask=mask[i : i + 1]
        ).sum().backward()
        params = dict(reference.named_parameters())
        for name in trainable:
            grad = params[name].grad
            assert grad is not None, name
            loop[name].append(grad.clone())
    # Execute
    private: Any = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    masked_errors(private, image, RECON, modality="ct", mask=mask).sum().backward()
    # Assert: every trained parameter, in the encoder and the decoder
    params = dict(model.named_parameters())
    assert any(n.startswith("backbone.") for n in trainable)
    assert any(n.startswith("tasks.masked.") for n in trainable)
    for name in trainable:
        grad_sample = params[name].grad_sample
        assert grad_sample is not None, name
        torch.testing.assert_close(grad_sample, torch.stack(loop[name]), atol=1e-8, rtol=1e-6)
    private.to_standard_module()
