"""Decoder deltas owned by a modality: a PET route adapts the segmentation decoder alone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus import GradSampleModule

from unicon_model.checkpoint import load_checkpoint, save_checkpoint
from unicon_model.components import set_trainable, split_by_component
from unicon_model.errors import GrowthError, PlanError
from unicon_model.lora_test import CT, SPEC, assert_unchanged, inputs, outputs, train_steps
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, StageSpec, TaskSpec, validate_plan

SEG = TaskSpec(name="seg", kind="segmentation", labels=("bg", "tumour"))
PET = ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct", decoder_lora={"seg": 2})


def seg_model() -> UniconModel:
    """ct with a trained-looking segmentation task, then a PET modality with decoder deltas."""
    model = UniconModel(SPEC)
    model.grow(StageSpec(name="s1", add_modalities=(CT,), add_tasks=(SEG,)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.grow(StageSpec(name="s2", add_modalities=(PET,), objectives=("seg",)))
    return model.eval()


def test_a_pet_route_starts_on_the_ct_decoder_and_training_it_leaves_ct_bit_identical() -> None:
    # Prepare
    model = seg_model()
    x = inputs(2)
    with torch.no_grad():
        ct_only = x.clone()
        ct_only[:, 1] = 0  # the new PET input has zero stem weights at first
        start_pet = model(x, modality="pet", task="seg")
        start_ct = model(x[:, :1], modality="ct", task="seg")
    before = outputs(model)
    # Execute: train only the PET modality (its stem, adapters and decoder deltas)
    train_steps(model, ["modality/pet"], "seg", "pet")
    after = outputs(model)
    # Assert: PET started exactly on the CT route; CT is bit-identical after training PET
    torch.testing.assert_close(start_pet, start_ct, atol=1e-6, rtol=0)
    assert_unchanged({"seg@ct": before["seg@ct"]}, {"seg@ct": after["seg@ct"]})
    assert not torch.equal(before["seg@pet"], after["seg@pet"])
    deltas = model.decoder_deltas("pet", "seg")
    assert deltas is not None and len(deltas) == 3  # two decoder blocks and the output conv
    assert all(float(deltas[i].up.weight.detach().abs().sum()) > 0 for i in range(3))
    assert model.decoder_deltas("ct", "seg") is None


def test_decoder_deltas_belong_to_the_modality_and_survive_a_checkpoint(tmp_path: Path) -> None:
    # Prepare
    model = seg_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".decoder_lora." in name:
                p.normal_(0, 0.1)
    # Execute
    grouped = split_by_component(model.state_dict())
    save_checkpoint(tmp_path / "v", grouped, version="v", model_config=model.config())
    manifest, components = load_checkpoint(tmp_path / "v")
    rebuilt = UniconModel.from_config(manifest.model_config_)
    rebuilt.load_state_dict({k: v for c in components.values() for k, v in c.items()})
    # Assert
    keys = [k for k in model.state_dict() if ".decoder_lora." in k]
    assert keys and all(k.startswith("modalities.pet.decoder_lora.seg.") for k in keys)
    assert set(keys) <= set(grouped["modality/pet"])
    x = inputs(2)
    with torch.no_grad():
        assert torch.equal(
            rebuilt.eval()(x, modality="pet", task="seg"), model(x, modality="pet", task="seg")
        )


def test_opacus_per_sample_gradients_of_decoder_deltas_equal_a_per_sample_loop() -> None:
    # Prepare
    model = seg_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".decoder_lora." in name:
                p.normal_(0, 0.1)
    trainable = set_trainable(model, ["modality/pet"])
    decoder = [n for n in trainable if ".decoder_lora." in n]
    assert decoder
    model.double().train()  # Opacus records activations in training mode only
    x = inputs(2, batch=3, seed=9).double()
    target = (x[:, 1] > 0).long()
    reference = copy.deepcopy(model)
    loop: dict[str, list[torch.Tensor]] = {n: [] for n in decoder}
    for i in range(3):
        reference.zero_grad()
        out = reference(x[i : i + 1], modality="pet", task="seg")
        torch.nn.functional.cross_entropy(out, target[i : i + 1], reduction="sum").backward()
        params = dict(reference.named_parameters())
        for name in decoder:
            grad = params[name].grad
            assert grad is not None
            loop[name].append(grad.clone())
    # Execute
    private: Any = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    out = private(x, modality="pet", task="seg")
    torch.nn.functional.cross_entropy(out, target, reduction="sum").backward()
    # Assert
    params = dict(model.named_parameters())
    for name in decoder:
        expected = torch.stack(loop[name])
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(params[name].grad_sample, expected, atol=1e-6, rtol=1e-5)
    private.to_standard_module()


def test_plan_check_and_growth_refuse_decoder_deltas_without_a_segmentation_decoder() -> None:
    raw = {
        "name": "p",
        "model": {"spatial_dims": 2, "widths": [4, 8]},
        "data": {"patch_size": [8, 8]},
        "stages": [
            {
                "name": "a",
                "add_modalities": [{"name": "ct", "decoder_lora": {"seg": 2}}],
                "add_tasks": [{"name": "cls", "kind": "classification", "classes": ["x", "y"]}],
            },
            {
                "name": "b",
                "add_modalities": [{"name": "pet", "decoder_lora": {"cls": 2, "nope": 1}}],
                "objectives": ["cls"],
            },
        ],
    }
    with pytest.raises(PlanError) as error:
        validate_plan(raw)
    text = str(error.value)
    assert "stages[0].add_modalities[0].decoder_lora.seg: no task 'seg' was added by an" in text
    assert "stages[1].add_modalities[0].decoder_lora.cls: task 'cls' is classification" in text
    assert "stages[1].add_modalities[0].decoder_lora.nope: no task 'nope'" in text
    model = UniconModel(SPEC)
    with pytest.raises(GrowthError, match="decoder_lora names task 'seg', which does not exist"):
        model.add_modality(ModalitySpec(name="ct", decoder_lora={"seg": 2}))
