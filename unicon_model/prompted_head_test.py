"""Box prompts in the segmentation head: one extra decoder input channel, owned by the head."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from opacus import GradSampleModule

from unicon_model.errors import ComponentError, PlanError
from unicon_model.heads import SegmentationHead
from unicon_model.model import UniconModel
from unicon_model.prompts import label_prompt
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec, validate_plan

SPEC = ModelSpec(spatial_dims=2, widths=(4, 8, 16), adapter_rank=2, head_hidden=8, seed=5)
CT = ModalitySpec(name="ct")
CLS = TaskSpec(name="cls", kind="classification", classes=("a", "b"))
PLAIN = TaskSpec(name="plain", kind="segmentation", labels=("bg", "organ"))
BOXED = TaskSpec(name="boxed", kind="segmentation", labels=("bg", "lesion"), prompt="box")

# today's state dict of an unprompted 2D head with widths (4, 8, 16) and 2 labels
UNPROMPTED_SHAPES = {
    "blocks.0.conv.weight": (8, 24, 3, 3),
    "blocks.0.conv.bias": (8,),
    "blocks.0.adn.N.weight": (8,),
    "blocks.0.adn.N.bias": (8,),
    "blocks.1.conv.weight": (4, 12, 3, 3),
    "blocks.1.conv.bias": (4,),
    "blocks.1.adn.N.weight": (4,),
    "blocks.1.adn.N.bias": (4,),
    "out.weight": (2, 4, 1, 1),
    "out.bias": (2,),
}


def x_of(batch: int = 2, seed: int = 1, channels: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


def model_with(*tasks: TaskSpec, modalities: tuple[ModalitySpec, ...] = (CT,)) -> UniconModel:
    model = UniconModel(SPEC)
    model.grow(StageSpec(name="s1", add_modalities=modalities, add_tasks=tasks))
    return model.eval()


def test_an_unprompted_head_keeps_todays_state_dict() -> None:
    head = SegmentationHead(2, (4, 8, 16), 2, norm="group")
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == UNPROMPTED_SHAPES
    assert not head.prompted


def test_a_prompted_head_has_one_more_input_channel_in_every_block() -> None:
    head = SegmentationHead(2, (4, 8, 16), 2, norm="group", prompted=True)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert set(shapes) == set(UNPROMPTED_SHAPES)
    assert shapes["blocks.0.conv.weight"] == (8, 25, 3, 3)
    assert shapes["blocks.1.conv.weight"] == (4, 13, 3, 3)
    assert shapes["out.weight"] == (2, 4, 1, 1)  # the output conv sees no prompt
    model = model_with(BOXED)
    prompt = torch.zeros(2, 1, 16, 16)
    prompt[:, :, 4:9, 2:12] = 1
    assert model(x_of(), modality="ct", task="boxed", prompt=prompt).shape == (2, 2, 16, 16)


def test_no_prompt_is_the_whole_image_and_the_box_changes_the_output() -> None:
    label = torch.zeros(2, 16, 16, dtype=torch.long)
    label[:, 3:6, 4:10] = 1
    model = model_with(BOXED)
    x = x_of()
    with torch.no_grad():
        unprompted = model(x, modality="ct", task="boxed")
        whole = model(x, modality="ct", task="boxed", prompt=torch.ones(2, 1, 16, 16))
        boxed = model(x, modality="ct", task="boxed", prompt=label_prompt(label))
    assert torch.equal(unprompted, whole)
    assert not torch.allclose(unprompted, boxed)


def test_a_prompted_task_leaves_every_other_route_bit_identical() -> None:
    x = x_of()
    alone = model_with(CLS, PLAIN)
    both = model_with(CLS, PLAIN, BOXED)
    with torch.no_grad():
        for task in ("cls", "plain"):
            assert torch.equal(
                alone(x, modality="ct", task=task), both(x, modality="ct", task=task)
            )
    assert {k: v.shape for k, v in alone.state_dict().items()} == {
        k: v.shape for k, v in both.state_dict().items() if not k.startswith("tasks.boxed.")
    }


def test_a_prompt_for_an_unprompted_task_or_of_a_wrong_shape_is_refused() -> None:
    model = model_with(PLAIN, BOXED)
    with pytest.raises(ComponentError, match="task 'plain' takes no box prompt"):
        model(x_of(), modality="ct", task="plain", prompt=torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"must have shape \(2, 1, size, size\)"):
        model(x_of(), modality="ct", task="boxed", prompt=torch.ones(2, 16, 16))


def test_decoder_deltas_read_the_wider_convolutions() -> None:
    pet = ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct", decoder_lora={"boxed": 2})
    model = model_with(BOXED)
    model.grow(StageSpec(name="s2", add_modalities=(pet,), objectives=("boxed",)))
    deltas = model.decoder_deltas("pet", "boxed")
    assert deltas is not None
    assert [deltas[i].down.in_channels for i in range(3)] == [25, 13, 4]
    prompt = torch.ones(2, 1, 16, 16)
    prompt[:, :, :8] = 0
    with torch.no_grad():
        ct_only = x_of(channels=2)
        ct_only[:, 1] = 0
        pet_out = model.eval()(ct_only, modality="pet", task="boxed", prompt=prompt)
        ct_out = model(ct_only[:, :1], modality="ct", task="boxed", prompt=prompt)
    torch.testing.assert_close(pet_out, ct_out, atol=1e-6, rtol=0)  # B = 0 at first


def test_opacus_per_sample_gradients_with_a_prompt_equal_a_per_sample_loop() -> None:
    model = model_with(BOXED).double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    x = x_of(batch=3, seed=4).double()
    target = (x[:, 0] > 0.5).long()
    prompt = label_prompt(target).double()
    reference = copy.deepcopy(model)
    private: Any = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    out = private(x, modality="ct", task="boxed", prompt=prompt)
    torch.nn.functional.cross_entropy(out, target, reduction="sum").backward()
    for i in range(3):
        reference.zero_grad()
        one = reference(x[i : i + 1], modality="ct", task="boxed", prompt=prompt[i : i + 1])
        torch.nn.functional.cross_entropy(one, target[i : i + 1], reduction="sum").backward()
        for (name, p), (_, p_ref) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            if p_ref.grad is not None and name.startswith("tasks.boxed.blocks"):
                grad_sample = p.grad_sample  # type: ignore[attr-defined]  # set by Opacus
                torch.testing.assert_close(grad_sample[i], p_ref.grad, atol=1e-8, rtol=1e-6)
    private.to_standard_module()


def _plan(*tasks: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "p",
        "model": {"spatial_dims": 2, "widths": [4, 8]},
        "data": {"patch_size": [8, 8]},
        "stages": [{"name": "a", "add_modalities": [{"name": "ct"}], "add_tasks": list(tasks)}],
    }


def test_plan_check_refuses_prompts_where_no_head_can_take_one_together() -> None:
    data = _plan(
        {"name": "cls", "kind": "classification", "classes": ["a", "b"], "prompt": "box"},
        {
            "name": "ridge",
            "kind": "segmentation",
            "labels": ["bg", "x"],
            "head": "analytic",
            "prompt": "box",
        },
        {"name": "seg", "kind": "segmentation", "labels": ["bg", "x"], "prompt_drop": 0.5},
        {
            "name": "far",
            "kind": "segmentation",
            "labels": ["bg", "x"],
            "prompt": "box",
            "prompt_jitter": 0.7,
        },
    )
    data["stages"][0]["rounds"] = 0
    with pytest.raises(PlanError) as caught:
        validate_plan(data)
    problems = caught.value.problems
    expected = [
        ("stages[0].add_tasks[0]", "task 'cls': prompt = 'box' is only for segmentation tasks"),
        ("stages[0].add_tasks[1]", "task 'ridge': prompt = 'box' needs a neural segmentation"),
        ("stages[0].add_tasks[2]", "task 'seg': `prompt_drop` is only for prompted tasks"),
        ("stages[0].add_tasks[3].prompt_jitter", ""),
        ("stages[0].rounds", ""),
    ]
    for start, text in expected:
        assert any(p.startswith(start) and text in p for p in problems), (start, problems)


def test_a_prompted_plan_validates_with_its_defaults() -> None:
    plan = validate_plan(
        _plan({"name": "seg", "kind": "segmentation", "labels": ["bg", "x"], "prompt": "box"})
    )
    task = plan.stages[0].add_tasks[0]
    assert (task.prompted, task.prompt_jitter, task.prompt_drop) == (True, 0.1, 0.25)
    assert not PLAIN.prompted and PLAIN.prompt == "none"
    rebuilt = UniconModel.from_config(model_with(BOXED).config())
    assert rebuilt.task_specs["boxed"].prompted
