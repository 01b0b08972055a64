"""Untrained task@modality routes are served by the trained route they were initialised from."""

from __future__ import annotations

import pytest
import torch

from unicon_model.errors import GrowthError
from unicon_model.model import UniconModel
from unicon_model.routes import (
    ServingRoute,
    parse_route,
    served_routes,
    serving_route,
    stage_routes,
)
from unicon_model.schema import ModalitySpec, ModelSpec, Plan, StageSpec, TaskSpec

SPEC = ModelSpec(spatial_dims=2, widths=(4, 8, 16), adapter_rank=2, head_hidden=8, seed=3)
CT = ModalitySpec(name="ct")
PET = ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct")
CLS = TaskSpec(name="cls", kind="classification", classes=("a", "b"))
SEG = TaskSpec(name="seg", kind="segmentation", labels=("bg", "t"))
STAGES = (
    StageSpec(name="s1", add_modalities=(CT,), add_tasks=(CLS,), train=("backbone", "task/cls")),
    StageSpec(name="s2", add_tasks=(SEG,)),
    StageSpec(name="s3", add_modalities=(PET,), objectives=("seg",)),
)


def grown_model() -> UniconModel:
    """CT classification and segmentation, then PET trained for segmentation only; every
    weight randomised as if trained (the PET adapters differ from the CT ones)."""
    model = UniconModel(SPEC)
    for stage in STAGES:
        model.grow(stage)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def test_stage_routes_are_its_objectives_on_its_modalities() -> None:
    # Execute / Assert: a stage adding no modality trains on every known one
    assert stage_routes(STAGES[0], ["ct"]) == {("cls", "ct")}
    assert stage_routes(STAGES[1], ["ct", "mr"]) == {("seg", "ct"), ("seg", "mr")}
    assert stage_routes(STAGES[2], ["ct", "pet"]) == {("seg", "pet")}


def test_an_untrained_route_is_served_by_its_source_modality_on_the_shared_channels() -> None:
    # Prepare: pet2 reads (pet, ct) and is initialised from pet, itself from ct
    pet2 = ModalitySpec(name="pet2", inputs=("pet", "ct"), init_from="pet")
    mr = ModalitySpec(name="mr", init_from="ct")  # reads no CT channel
    modalities = {m.name: m for m in (CT, PET, pet2, mr)}
    trained = {("cls", "ct"), ("seg", "ct"), ("seg", "pet")}
    # Execute / Assert
    assert serving_route(modalities, trained, "cls", "pet") == ServingRoute("ct", (0,))
    assert serving_route(modalities, trained, "seg", "pet") == ServingRoute("pet")
    assert serving_route(modalities, trained, "cls", "pet2") == ServingRoute("ct", (1,))
    assert serving_route(modalities, trained, "seg", "pet2") == ServingRoute("pet", (1, 0))
    assert serving_route(modalities, trained, "cls", "mr") == ServingRoute("mr")
    assert serving_route(modalities, trained, "new", "pet") == ServingRoute("pet")  # nowhere
    assert serving_route(modalities, None, "cls", "pet") == ServingRoute("pet")  # unknown


def test_growth_records_the_trained_routes() -> None:
    # Execute
    model = grown_model()
    # Assert
    assert model.trained_routes == {("cls", "ct"), ("seg", "ct"), ("seg", "pet")}
    assert model.serving_route("pet", "cls") == ServingRoute("ct", (0,))
    assert model.serving_route("pet", "seg") == ServingRoute("pet")


def test_the_plan_names_the_routes_another_route_serves() -> None:
    # Prepare
    plan = Plan(name="p", model=SPEC, stages=STAGES)
    # Execute / Assert: what the grown model does, from the plan alone
    assert served_routes(plan) == {"cls@pet": "cls@ct"}
    model = grown_model()
    assert {
        f"{t}@{m}": f"{t}@{model.serving_route(m, t).modality}"
        for t in model.task_specs
        for m in model.modality_specs
        if model.serving_route(m, t).channels is not None
    } == served_routes(plan)


def test_a_pet_ct_case_sent_to_classification_gets_the_ct_route_on_its_ct_channel() -> None:
    # Prepare
    model = grown_model()
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Execute
        cls_pet = model(x, modality="pet", task="cls")
        cls_ct = model(x[:, :1], modality="ct", task="cls")
        seg_pet = model(x, modality="pet", task="seg")
        seg_ct = model(x[:, :1], modality="ct", task="seg")
        # what the untrained route itself would give: the PET adapters' features
        model.trained_routes = None
        cls_pet_itself = model(x, modality="pet", task="cls")
    # Assert: served by the CT route exactly; the trained PET route is PET's own
    assert torch.equal(cls_pet, cls_ct)
    assert not torch.allclose(cls_pet_itself, cls_ct, atol=1e-3)
    assert not torch.allclose(seg_pet, seg_ct, atol=1e-3)


def test_a_served_route_still_refuses_an_input_of_the_wrong_width() -> None:
    model = grown_model()
    with pytest.raises(ValueError, match=r"modality 'pet' expects input \(B, 2"):
        model(torch.zeros(1, 1, 16, 16), modality="pet", task="cls")


def test_the_trained_routes_travel_in_the_config_and_an_older_config_serves_routes_directly() -> (
    None
):
    # Prepare
    model = grown_model()
    config = model.config()
    legacy = {k: v for k, v in config.items() if k != "trained_routes"}
    # Execute
    rebuilt = UniconModel.from_config(config)
    older = UniconModel.from_config(legacy)
    older.grow(StageSpec(name="s4", add_tasks=(TaskSpec(name="x", kind="survival"),)))
    # Assert
    assert config["trained_routes"] == ["cls@ct", "seg@ct", "seg@pet"]
    assert rebuilt.trained_routes == model.trained_routes
    assert older.trained_routes is None  # unknown stays unknown after growing
    assert older.serving_route("pet", "cls") == ServingRoute("pet")


def test_components_added_one_by_one_serve_every_route_directly() -> None:
    model = UniconModel(SPEC)
    model.add_modality(CT)
    model.add_task(CLS)
    model.add_modality(PET)
    assert model.trained_routes is None
    assert model.serving_route("pet", "cls") == ServingRoute("pet")


@pytest.mark.parametrize("routes", [["cls-ct"], ["@ct"], "cls@ct", [1], [None], {"a": "b"}])
def test_a_config_with_malformed_routes_is_refused_by_name(routes: object) -> None:
    config = grown_model().config()
    config["trained_routes"] = routes
    with pytest.raises(GrowthError, match=r"invalid model config: .*(route|trained_routes)"):
        UniconModel.from_config(config)


def test_parse_route() -> None:
    assert parse_route("lesion-class@pet") == ("lesion-class", "pet")
    with pytest.raises(ValueError, match="task@modality"):
        parse_route("a@b@c")
