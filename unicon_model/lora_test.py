"""LoRA deltas of the shared encoder: isolation of routes, ownership, checkpoints, DP-SGD."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus import GradSampleModule

from unicon_model.checkpoint import load_checkpoint, save_checkpoint
from unicon_model.components import select_state, set_trainable, split_by_component
from unicon_model.errors import GrowthError, PlanError
from unicon_model.lora import ConvDelta, EncoderDeltas, deltas_of
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec, validate_plan

SPEC = ModelSpec(spatial_dims=2, widths=(4, 8, 16), adapter_rank=2, head_hidden=8, seed=5)
CT = ModalitySpec(name="ct")
PET = ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct", lora_rank=2)
CLS = TaskSpec(name="cls", kind="classification", classes=("a", "b"))
SURV = TaskSpec(name="surv", kind="survival", covariates=("age",))
SEG = TaskSpec(name="seg", kind="segmentation", labels=("bg", "tumour"), lora_rank=2)
SEG2 = TaskSpec(
    name="seg2", kind="segmentation", labels=("bg", "t"), lora_rank=4, lora_levels=(1, 2)
)


def base_model() -> UniconModel:
    """ct with a classification and a survival task, weights randomised ("trained")."""
    model = UniconModel(SPEC)
    model.grow(StageSpec(name="s1", add_modalities=(CT,), add_tasks=(CLS,)))
    model.grow(StageSpec(name="s2", add_tasks=(SURV,)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def inputs(channels: int = 1, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def outputs(model: UniconModel) -> dict[str, torch.Tensor]:
    """Output of every route of the model (task@modality)."""
    result = {}
    with torch.no_grad():
        for modality, spec in model.modality_specs.items():
            x = inputs(len(spec.input_keys))
            for task in model.task_specs:
                clinical = torch.ones(2, 1) if task == "surv" else None
                out = model(x, modality=modality, task=task, clinical=clinical)
                result[f"{task}@{modality}"] = out.clone()
    return result


def train_steps(model: UniconModel, components: list[str], task: str, modality: str) -> None:
    """A few Adam steps on ``components`` for the route ``task@modality``."""
    set_trainable(model, components)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=0.05)
    x = inputs(len(model.modality_specs[modality].input_keys), seed=3)
    target = (x[:, :1] > 0.5).long().squeeze(1)
    model.train()
    for _ in range(3):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, modality=modality, task=task), target)
        loss.backward()
        optimiser.step()
    model.eval()


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    for route, value in before.items():
        diff = (after[route] - value).abs().max().item()
        assert diff <= 1e-6, f"{route} changed by {diff}"
        assert torch.equal(after[route], value), route  # in fact bit-identical


def test_b_is_zero_so_a_new_delta_changes_nothing_until_trained() -> None:
    # Prepare
    model = base_model()
    x = inputs()
    plain = [f.clone() for f in model.encode(x, modality="ct")]
    # Execute
    model.grow(StageSpec(name="s3", add_tasks=(SEG,)))
    deltas = deltas_of(model.tasks["seg"])
    # Assert: B = 0, A is not; the new route's features equal the route without deltas
    assert isinstance(deltas, EncoderDeltas) and sorted(deltas.levels) == ["0", "1", "2"]
    for delta in deltas.modules():
        if isinstance(delta, ConvDelta):
            assert not delta.up.weight.any() and delta.down.weight.any()
    with torch.no_grad():
        routed = model.encode(x, modality="ct", task="seg")
    for a, b in zip(plain, routed, strict=True):
        assert torch.equal(a, b)


def test_a_delta_is_the_convolution_with_b_times_a() -> None:
    # Prepare: random B, and a copy of the model whose encoder weights are W + B·A
    model = base_model()
    model.grow(StageSpec(name="s3", add_tasks=(SEG2,)))
    deltas = deltas_of(model.tasks["seg2"])
    assert deltas is not None and sorted(deltas.levels) == ["1", "2"]
    with torch.no_grad():
        for p in deltas.parameters():
            p.normal_(0, 0.1)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for level, units in deltas.levels.items():
            for unit, delta in units.items():
                assert isinstance(delta, ConvDelta)
                conv = merged.backbone.levels[int(level)].get_submodule(f"conv.{unit}.conv")
                assert delta.weight().shape == conv.weight.shape
                conv.weight += delta.weight()
        x = inputs()
        # Execute
        routed = model.encode(x, modality="ct", task="seg2")
        reference = merged.encode(x, modality="ct")
    # Assert
    for a, b in zip(routed, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_merged_and_branch_forms_give_the_same_output_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a PET route with the modality's and the task's deltas on the same levels, B
    # random; a copy whose delta layers carry a forward hook runs them as branches
    model = base_model()
    model.grow(StageSpec(name="s3", add_tasks=(SEG,)))
    model.grow(StageSpec(name="s4", add_modalities=(PET,), objectives=("seg",)))
    with torch.no_grad():
        for owner in (model.tasks["seg"], model.modalities["pet"]):
            deltas = deltas_of(owner)
            assert deltas is not None
            for p in deltas.parameters():
                p.normal_(0, 0.1)
    branched = copy.deepcopy(model)
    calls: list[str] = []
    for name, module in branched.named_modules():
        if isinstance(module, ConvDelta):
            module.down.register_forward_hook(lambda *_, name=name: calls.append(name))
            assert module.observed
    branch_runs: list[int] = []
    branch_forward = ConvDelta.forward

    def counted(self: ConvDelta, x: torch.Tensor) -> torch.Tensor:
        branch_runs.append(id(self))
        return branch_forward(self, x)

    monkeypatch.setattr(ConvDelta, "forward", counted)
    lora = [n for n, _ in model.named_parameters() if ".lora." in n]
    x = inputs(channels=2, seed=4)
    target = (x[:, :1] > 0.5).long().squeeze(1)
    grads: list[dict[str, torch.Tensor]] = []
    outs = []
    # Execute
    runs = []
    for net in (model, branched):
        set_trainable(net, ["task/seg", "modality/pet"])
        out = net(x, modality="pet", task="seg")
        runs.append(len(branch_runs))
        torch.nn.functional.cross_entropy(out, target).backward()
        params = dict(net.named_parameters())
        grads.append({n: params[n].grad.clone() for n in lora})  # type: ignore[union-attr]
        outs.append(out.detach())
    # Assert: the plain model merged every delta; the hooked copy ran both owners' deltas
    # as branches, 2 units x 3 levels each
    assert runs == [0, 2 * 2 * 3] and len(calls) == 2 * 2 * 3
    assert not any(isinstance(m, ConvDelta) and m.observed for m in model.modules())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    assert len(lora) == 2 * 2 * 3 * 2
    for name in lora:
        assert grads[1][name].abs().max() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)


def test_growing_and_training_a_lora_task_leaves_every_other_route_bit_identical() -> None:
    # Prepare
    model = base_model()
    before = outputs(model)
    # Execute: grow a segmentation task with deltas, then train only its component
    model.grow(StageSpec(name="s3", add_tasks=(SEG, SEG2)))
    after_growth = outputs(model)
    seg_init = after_growth["seg@ct"].clone()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("tasks.seg.")}
    train_steps(model, ["task/seg"], "seg", "ct")
    after_training = outputs(model)
    # Assert: old routes and the other new task's route unchanged; the new route moved
    assert_unchanged(before, after_growth)
    assert_unchanged(before, after_training)
    assert torch.equal(after_training["seg2@ct"], after_growth["seg2@ct"])
    assert not torch.equal(after_training["seg@ct"], seg_init)
    deltas = deltas_of(model.tasks["seg"])
    assert deltas is not None and any(
        d.up.weight.any() for d in deltas.modules() if isinstance(d, ConvDelta)
    )
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key


def test_a_pet_modality_owns_its_deltas_and_starts_equal_to_the_ct_route() -> None:
    # Prepare: ct with trained deltas of its own
    model = UniconModel(SPEC)
    ct = ModalitySpec(name="ct", lora_rank=2)
    model.grow(StageSpec(name="s1", add_modalities=(ct,), add_tasks=(CLS,)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ct_only = inputs(1)
    with torch.no_grad():
        ct_route = model(ct_only, modality="ct", task="cls")
    # Execute: PET initialised from ct (PEMMA), then trained on its own
    model.grow(StageSpec(name="s2", add_modalities=(PET,), objectives=("cls",)))
    stacked = torch.cat([ct_only, torch.randn_like(ct_only)], dim=1)
    with torch.no_grad():
        pet_route = model(stacked, modality="pet", task="cls")
    before = outputs(model)
    train_steps_pet(model)
    after = outputs(model)
    # Assert: the PET deltas are copied from ct's, live under modality/pet; ct unchanged
    torch.testing.assert_close(pet_route, ct_route, atol=1e-6, rtol=0)
    keys = split_by_component(model.state_dict())["modality/pet"]
    assert any(k.startswith("modalities.pet.lora.levels.2.unit1.up") for k in keys)
    assert torch.equal(after["cls@ct"], before["cls@ct"])
    assert not torch.equal(after["cls@pet"], before["cls@pet"])


def train_steps_pet(model: UniconModel) -> None:
    set_trainable(model, ["modality/pet"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.5)
    x = inputs(2, seed=4)
    for _ in range(2):
        optimiser.zero_grad()
        model(x, modality="pet", task="cls").logsumexp(1).sum().backward()
        optimiser.step()
    model.eval()


def test_deltas_belong_to_their_component_and_survive_a_checkpoint(tmp_path: Path) -> None:
    # Prepare
    model = base_model()
    model.grow(StageSpec(name="s3", add_modalities=(PET,), add_tasks=(SEG,), objectives=("seg",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_()
    # Execute
    grouped = split_by_component(model.state_dict())
    save_checkpoint(tmp_path / "v", grouped, version="v", model_config=model.config())
    manifest, components = load_checkpoint(tmp_path / "v")
    rebuilt = UniconModel.from_config(manifest.model_config_)
    rebuilt.load_state_dict({k: v for c in components.values() for k, v in c.items()})
    # Assert: every delta key is in its owner's component, and the round trip is exact
    lora = [k for k in model.state_dict() if ".lora." in k]
    assert lora and all(k.startswith(("tasks.seg.lora.", "modalities.pet.lora.")) for k in lora)
    assert not any(".lora." in k for k in grouped["backbone"])
    assert set(select_state(model, ["task/seg"])) == set(grouped["task/seg"])
    assert rebuilt.task_specs["seg"].lora_rank == 2
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = inputs(2)
    with torch.no_grad():
        assert torch.equal(
            rebuilt(x, modality="pet", task="seg"), model.eval()(x, modality="pet", task="seg")
        )


def test_opacus_per_sample_gradients_of_deltas_equal_a_per_sample_loop() -> None:
    # Prepare: the route seg@pet trains the task's and the modality's deltas (+ head, stem)
    model = base_model()
    model.grow(StageSpec(name="s3", add_modalities=(PET,), add_tasks=(SEG,), objectives=("seg",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.1)
    trainable = set_trainable(model, ["task/seg", "modality/pet"])
    lora = [n for n in trainable if ".lora." in n]
    assert any(n.startswith("tasks.seg.") for n in lora)
    assert any(n.startswith("modalities.pet.") for n in lora)
    model.double()  # float64, so that summation order cannot hide a wrong per-sample gradient
    x = inputs(2, batch=3, seed=9).double()
    target = (x[:, 1] > 0).long()
    reference = copy.deepcopy(model)
    loop: dict[str, list[torch.Tensor]] = {n: [] for n in trainable}
    for i in range(3):
        reference.zero_grad()
        out = reference(x[i : i + 1], modality="pet", task="seg")
        torch.nn.functional.cross_entropy(out, target[i : i + 1], reduction="sum").backward()
        params = dict(reference.named_parameters())
        for name in trainable:
            grad = params[name].grad
            assert grad is not None
            loop[name].append(grad.clone())
    # Execute
    private = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    out = private(x, modality="pet", task="seg")
    torch.nn.functional.cross_entropy(out, target, reduction="sum").backward()
    # Assert
    params = dict(model.named_parameters())
    for name in lora:
        grad_sample = params[name].grad_sample
        assert grad_sample is not None, name
        expected = torch.stack(loop[name])
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(grad_sample, expected, atol=1e-6, rtol=1e-5)
    private.to_standard_module()


def _plan(**model: Any) -> dict[str, Any]:
    return {
        "name": "p",
        "model": {"spatial_dims": 3, "widths": [4, 8, 16], **model},
        "data": {"patch_size": [16, 16, 16]},
        "stages": [
            {
                "name": "a",
                "add_modalities": [{"name": "ct", "lora_rank": 2, "lora_levels": [0, 3]}],
                "add_tasks": [
                    {
                        "name": "ridge",
                        "kind": "classification",
                        "classes": ["x", "y"],
                        "head": "analytic",
                        "lora_rank": 2,
                    }
                ],
                "rounds": 1,
            },
            {
                "name": "b",
                "add_modalities": [{"name": "pet", "lora_levels": [1]}],
                "add_tasks": [
                    {"name": "seg", "kind": "segmentation", "labels": ["b", "t"], "lora_rank": 6}
                ],
            },
        ],
    }


def test_plan_check_lists_every_lora_problem_with_its_field_path() -> None:
    # Execute
    with pytest.raises(PlanError) as raised:
        validate_plan(_plan(), source="plan.toml")
    # Assert
    text = str(raised.value)
    assert "stages[0].add_modalities[0].lora_levels[1]: encoder level 3 does not exist" in text
    assert "levels 0..2" in text
    assert "stages[0].add_tasks[0].lora_rank: an analytic head" in text
    assert "stages[1].add_modalities[0].lora_levels: set but lora_rank is 0" in text
    assert "stages[1].add_tasks[0].lora_rank: rank 6 exceeds the channels of level 0" in text
    assert "level 1 (4 channels)" in text and "use lora_rank <= 4" in text
    assert "level 2" not in text.split("rank 6 exceeds")[1].split("\n")[0]


def test_plan_check_accepts_ranks_that_fit_the_chosen_levels() -> None:
    # Prepare: rank 6 fits levels 1..2 of widths (8, 16, 32) but not level 0 (8 -> fits)
    raw = _plan()
    raw["model"]["widths"] = [8, 16, 32]
    raw["stages"][0]["add_modalities"][0]["lora_levels"] = [0, 2]
    raw["stages"][0]["add_tasks"][0].pop("lora_rank")
    raw["stages"][1]["add_modalities"][0]["lora_rank"] = 1
    # Execute
    plan = validate_plan(raw)
    model = UniconModel.from_plan(plan)
    # Assert
    assert plan.stages[1].add_tasks[0].lora_rank == 6
    assert sorted(deltas_of(model.tasks["seg"]).levels) == ["0", "1", "2"]  # type: ignore[union-attr]
    assert sorted(deltas_of(model.modalities["ct"]).levels) == ["0", "2"]  # type: ignore[union-attr]
    assert deltas_of(model.tasks["ridge"]) is None


def test_task_spec_refuses_a_negative_rank() -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        TaskSpec(name="t", kind="survival", lora_rank=-1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TaskSpec(name="seg", kind="segmentation", labels=("b", "t"), lora_rank=5), "rank 5"),
        (ModalitySpec(name="pet", lora_rank=1, lora_levels=(7,)), r"levels \[7\] do not"),
        (
            TaskSpec(
                name="r", kind="classification", classes=("a", "b"), head="analytic", lora_rank=1
            ),
            "analytic head",
        ),
    ],
)
def test_growth_refuses_deltas_the_encoder_cannot_hold(
    spec: TaskSpec | ModalitySpec, message: str
) -> None:
    # Prepare: a model built without plan validation (e.g. from a stored config)
    model = base_model()
    keys = list(model.state_dict())
    stage = (
        StageSpec(name="x", add_tasks=(spec,))
        if isinstance(spec, TaskSpec)
        else StageSpec(name="x", add_modalities=(spec,), objectives=("cls",))
    )
    # Execute / Assert: a clear error naming the component; the model is unchanged
    with pytest.raises(GrowthError, match=message):
        model.grow(stage)
    assert list(model.state_dict()) == keys
