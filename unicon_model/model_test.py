"""Tests of the growing model: growth, routing, isolation, Opacus compatibility."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from unicon_model.components import select_state, set_trainable
from unicon_model.errors import ComponentError, GrowthError
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec

CLS = TaskSpec(name="cls", kind="classification", classes=("a", "b", "c"))
SURV = TaskSpec(name="surv", kind="survival", covariates=("age", "stage"))
SEG = TaskSpec(name="seg", kind="segmentation", labels=("bg", "tumour"))
RIDGE = TaskSpec(name="ridge", kind="classification", classes=("a", "b"), head="analytic")
STAGES = (
    StageSpec(name="s1", add_modalities=(ModalitySpec(name="ct"),), add_tasks=(CLS,)),
    StageSpec(name="s2", add_tasks=(SURV,)),
    StageSpec(name="s3", add_tasks=(SEG,)),
    StageSpec(
        name="s4",
        add_modalities=(ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct"),),
        objectives=("seg",),
    ),
)


def grown(spec: ModelSpec, stages: tuple[StageSpec, ...] = STAGES) -> UniconModel:
    model = UniconModel(spec)
    for stage in stages:
        model.grow(stage)
    return model


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter (zero-initialised adapters too) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_same_specs_give_identical_keys_shapes_and_values() -> None:
    # Prepare / Execute: two "sites" grow a model from the same stage specs
    site_a = grown(ModelSpec())
    site_b = grown(ModelSpec())
    # Assert
    state_a, state_b = site_a.state_dict(), site_b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert state_a[key].shape == state_b[key].shape
        assert torch.equal(state_a[key], state_b[key]), key
    assert site_a.component_names == [
        "backbone",
        "modality/ct",
        "modality/pet",
        "task/cls",
        "task/surv",
        "task/seg",
    ]


def test_a_different_seed_gives_different_initial_values() -> None:
    a = UniconModel(ModelSpec(seed=0)).state_dict()
    b = UniconModel(ModelSpec(seed=1)).state_dict()
    assert not torch.equal(
        a["backbone.levels.0.conv.unit0.conv.weight"], b["backbone.levels.0.conv.unit0.conv.weight"]
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_shapes_of_every_head(spatial_dims: int) -> None:
    model = grown(ModelSpec(spatial_dims=spatial_dims))
    model.add_task(RIDGE)
    size = (16,) * spatial_dims
    x = torch.randn(2, 1, *size)
    clinical = torch.randn(2, 2)
    assert model(x, modality="ct", task="cls").shape == (2, 3)
    assert model(x, modality="ct", task="surv", clinical=clinical).shape == (2,)
    assert model(x, modality="ct", task="seg").shape == (2, 2, *size)
    assert model(x, modality="ct", task="ridge").shape == (2, 2)
    two_channel = torch.randn(2, 2, *size)
    assert model(two_channel, modality="pet", task="seg").shape == (2, 2, *size)


def test_adding_components_leaves_existing_outputs_unchanged() -> None:
    # Prepare: a trained-looking foundation model (random values in every parameter)
    model = grown(ModelSpec(spatial_dims=2), STAGES[:1])
    randomise(model)
    x = torch.randn(3, 1, 16, 16)
    before = model(x, modality="ct", task="cls").detach().clone()
    # Execute: grow a new modality (with fresh adapters) and new task heads
    model.grow(STAGES[1])
    model.add_modality(ModalitySpec(name="mr"))
    model.grow(STAGES[2])
    after = model(x, modality="ct", task="cls")
    # Assert: bit-identical
    assert torch.equal(before, after)


def test_new_adapters_are_zero_initialised_identity() -> None:
    # Prepare: random foundation weights
    model = grown(ModelSpec(spatial_dims=2), STAGES[:1])
    randomise(model)
    model.add_modality(ModalitySpec(name="mr"))
    # Assert: every residual adapter of the new modality is the identity
    h = torch.randn(2, 8, 16, 16)
    assert torch.equal(model.modalities["mr"].adapters[0](h), h)


def test_init_from_starts_the_new_modality_equal_to_its_source() -> None:
    # Prepare: random CT weights, then grow PET (inputs ct+pet) initialised from CT
    model = grown(ModelSpec(spatial_dims=2), STAGES[:3])
    randomise(model)
    model.grow(STAGES[3])
    ct = torch.randn(2, 1, 16, 16)
    pet = torch.randn(2, 1, 16, 16) * 5
    # Execute
    ct_path = model(ct, modality="ct", task="seg")
    pet_path = model(torch.cat([ct, pet], dim=1), modality="pet", task="seg")
    # Assert: the PET channel has zero stem weights, so both paths agree
    assert torch.allclose(ct_path, pet_path, atol=1e-5)
    stem = model.modalities["pet"].stem.conv.weight
    assert torch.count_nonzero(stem[:, 1]) == 0
    assert torch.equal(stem[:, 0], model.modalities["ct"].stem.conv.weight[:, 0])


def test_frozen_components_receive_no_gradient() -> None:
    # Prepare: a stage that trains only the survival head
    model = grown(ModelSpec(spatial_dims=2))
    trainable = set_trainable(model, ["task/surv"])
    x = torch.randn(2, 1, 16, 16)
    # Execute
    model(x, modality="ct", task="surv", clinical=torch.randn(2, 2)).sum().backward()
    # Assert
    assert trainable and all(name.startswith("tasks.surv.") for name in trainable)
    for name, p in model.named_parameters():
        if name.startswith("tasks.surv."):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_trainable_subset_roundtrip_changes_only_that_subset() -> None:
    # Prepare
    model = grown(ModelSpec(spatial_dims=2))
    before = copy.deepcopy(model.state_dict())
    update = {k: v + 1.0 for k, v in select_state(model, ["modality/pet"]).items()}
    # Execute
    from unicon_model.components import load_state

    load_state(model, update, components=["modality/pet"])
    # Assert
    after = model.state_dict()
    for key in after:
        if key.startswith("modalities.pet."):
            assert torch.equal(after[key], before[key] + 1.0)
        else:
            assert torch.equal(after[key], before[key])


def test_growth_conflicts_are_refused() -> None:
    model = grown(ModelSpec(spatial_dims=2), STAGES[:1])
    assert model.grow(STAGES[0]) == []  # identical re-growth is a no-op
    with pytest.raises(GrowthError, match="different spec"):
        model.add_task(TaskSpec(name="cls", kind="classification", classes=("x", "y")))
    with pytest.raises(GrowthError, match="init_from 'mr' does not exist"):
        model.add_modality(ModalitySpec(name="pet", init_from="mr"))


def test_bad_inputs_name_the_problem() -> None:
    model = grown(ModelSpec(spatial_dims=2), STAGES[:1])
    with pytest.raises(ComponentError, match="unknown modality 'pet'"):
        model(torch.zeros(1, 1, 16, 16), modality="pet", task="cls")
    with pytest.raises(ValueError, match=r"expects input \(B, 1, size, size\)"):
        model(torch.zeros(1, 2, 16, 16), modality="ct", task="cls")
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 12, 12), modality="ct", task="cls")


def test_config_roundtrip_rebuilds_the_same_model() -> None:
    model = grown(ModelSpec(spatial_dims=2))
    randomise(model)
    rebuilt = UniconModel.from_config(model.config())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 16, 16)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert torch.equal(model(x, modality="pet", task="seg"), rebuilt(x, modality="pet", task="seg"))


@pytest.mark.parametrize(
    ("spatial_dims", "norm"), list(itertools.product([2, 3], ["group", "instance"]))
)
def test_every_configuration_passes_opacus_strict_validation(spatial_dims: int, norm: str) -> None:
    model = grown(ModelSpec(spatial_dims=spatial_dims, norm=norm))  # type: ignore[arg-type]
    model.add_task(RIDGE)
    assert ModuleValidator.validate(model, strict=True) == []


def test_opacus_per_sample_gradients_match_a_per_sample_loop() -> None:
    # Prepare: every parameter trainable, a 2D model with the segmentation decoder
    model = grown(ModelSpec(spatial_dims=2, norm="instance"))
    randomise(model)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 1, 16, 16)
    target = torch.randint(0, 2, (3, 16, 16))

    def loss_of(m: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = m(xb, modality="ct", task="seg")
        return torch.nn.functional.cross_entropy(logits, yb, reduction="sum")

    # Execute: Opacus per-sample gradients (forward must go through the wrapper)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    loss_of(wrapped, x, target).backward()
    # Assert: equal to the gradient of each sample alone
    for i in range(3):
        reference.zero_grad()
        loss_of(reference, x[i : i + 1], target[i : i + 1]).backward()
        for (name, p), (_, p_ref) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            if p_ref.grad is None:
                continue
            assert torch.allclose(p.grad_sample[i], p_ref.grad, atol=1e-5, rtol=1e-4), name
