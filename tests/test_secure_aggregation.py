"""Secure stages through Flower's real SecAgg+ workflow and client mod (in-process nodes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from safetensors.torch import load_file
from sklearn.linear_model import Ridge

from client.data import build_dataset
from client.manifest import load_manifest
from client.site_folder import manifest_in
from server.coordinator import Coordinator
from server.registry import Registry
from server.secure_aggregation import safe_quantization_range
from simulations.inprocess import InProcessTransport
from simulations.synthetic import make_sites
from tests.conftest import tiny_plan
from unicon_model.components import select_state
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan


def secure_plan(**stage: Any) -> Plan:
    raw = tiny_plan()
    first = raw["stages"][0]
    first.update(
        rounds=1,
        min_sites=3,
        secure_aggregation=True,
        secagg={"num_shares": 3, "reconstruction_threshold": 2},
        **stage,
    )
    raw["stages"] = [first]
    return validate_plan(raw)


def stored_updates(
    state_root: Path, sites: list[str]
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Each site's own stored reply of the round (the oracle's view, never the server's)."""
    updates = []
    for site in sites:
        metas = list((state_root / site / "replies").glob("*.json"))
        assert len(metas) == 1, f"{site} should have served exactly one train request"
        meta = json.loads(metas[0].read_text())
        updates.append(
            (load_file(str(metas[0].with_suffix(".safetensors"))), meta["metrics"]["num-examples"])
        )
    return updates


def weighted_mean(updates: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in updates)
    return {
        k: sum(u[k].double() * (w / total) for u, w in updates)  # type: ignore[misc]
        for k in updates[0][0]
    }


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secure-sites")
    make_sites(out, sites=4, seed=11, size=16, cases_per_site=10, pet_sites=0)
    return out


def sites_of(folder: Path, n: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())[:n]


def test_secure_round_equals_plain_fedavg_of_the_site_updates(
    four_sites: Path, tmp_path: Path
) -> None:
    # Prepare: three sites, a one-round secure foundation stage
    plan = secure_plan()
    folders = sites_of(four_sites, 3)
    transport = InProcessTransport(folders, tmp_path / "state")
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: the server only ever handled the unmasked mean, which equals FedAvg of what the
    # sites computed (read from their own state) within SecAgg+'s quantisation error
    assert [m.message_type for m in transport.sent if m.message_type == "train"] == []
    (secure,) = transport.secure_rounds
    assert secure.failed == [] and sorted(secure.num_examples) == [1, 2, 3]
    model, manifest = registry.load(registry.versions()[-1])
    expected = weighted_mean(stored_updates(tmp_path / "state", [f.name for f in folders]))
    state = select_state(model, plan.stages[0].trained_components)
    assert set(state) == set(expected)
    worst = max(float((state[k].double() - v).abs().max()) for k, v in expected.items())
    assert worst < 1e-4, f"secure mean differs from FedAvg by {worst}"
    # not trivially equal: the sites' updates differ from one another
    a, b = (u for u, _ in stored_updates(tmp_path / "state", [f.name for f in folders])[:2])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3
    assert manifest.lineage.sites == [f.name for f in folders]
    round_record = next(r for r in registry.metrics(plan.name) if r["kind"] == "round")
    assert round_record["secure"] is True and round_record["clipped"] == {
        f.name: 0 for f in folders
    }


def test_secure_round_completes_with_one_site_dropping_out(
    four_sites: Path, tmp_path: Path
) -> None:
    # Prepare: four sites; site 4 vanishes after the key exchange, before sending its vector
    plan = secure_plan()
    folders = sites_of(four_sites, 4)
    transport = InProcessTransport(folders, tmp_path / "state")

    def drop(message: Message) -> bool:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        return (
            message.metadata.dst_node_id == 4
            and configs is not None
            and configs.get("stage") in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
        )

    transport.in_process_grid.drop = drop
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: the round completed over the three remaining sites and equals their FedAvg
    (secure,) = transport.secure_rounds
    assert secure.failed == [4]
    model, _ = registry.load(registry.versions()[-1])
    remaining = [f.name for f in folders[:3]]
    expected = weighted_mean(stored_updates(tmp_path / "state", remaining))
    state = select_state(model, plan.stages[0].trained_components)
    worst = max(float((state[k].double() - v).abs().max()) for k, v in expected.items())
    assert worst < 1e-4
    round_record = next(r for r in registry.metrics(plan.name) if r["kind"] == "round")
    assert round_record["failed"] == {folders[3].name: "dropped out of secure aggregation"}


def test_secure_analytic_stage_equals_pooled_ridge(four_sites: Path, tmp_path: Path) -> None:
    # Prepare: a plain foundation stage, then a secure analytic ridge head on frozen features
    raw = tiny_plan()
    raw["stages"] = [
        {**raw["stages"][0], "rounds": 1},
        {
            "name": "ridge",
            "add_tasks": [
                {
                    "name": "lesion-class",
                    "kind": "classification",
                    "classes": ["benign", "malignant"],
                    "head": "analytic",
                    "l2": 0.5,
                }
            ],
            "rounds": 1,
            "min_sites": 3,
            "secure_aggregation": True,
            "secagg": {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 256.0},
        },
    ]
    raw["stages"][0]["add_tasks"] = [
        {"name": "survival", "kind": "survival", "covariates": ["age", "stage"]}
    ]
    raw["stages"][0]["train"] = ["backbone", "modality/ct", "task/survival"]
    plan = validate_plan(raw)
    folders = sites_of(four_sites, 3)
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, InProcessTransport(folders, tmp_path / "state"), site_wait=0).run()
    # Assert: the ridge head equals sklearn's Ridge on the pooled features of all sites
    model, _ = registry.load(registry.versions()[-1])
    foundation, _ = registry.load(registry.versions()[0])
    task = plan.tasks_until(1)["lesion-class"]
    features, targets = [], []
    for folder in folders:
        data = build_dataset(
            load_manifest(manifest_in(folder)),
            split="train",
            modality=plan.modalities_until(0)["ct"],
            tasks={"lesion-class": task},
            data=plan.data,
        )
        images = torch.stack([s["image"] for s in data.samples])
        with torch.no_grad():
            features.append(foundation.pooled_features(images, modality="ct").double().numpy())
        labels = np.array([int(s["lesion-class:label"]) for s in data.samples])
        targets.append(np.eye(2)[labels])
    pooled = np.concatenate(features)
    reference = Ridge(alpha=0.5).fit(pooled, np.concatenate(targets))
    head = model.tasks["lesion-class"]
    np.testing.assert_allclose(head.weight.double().numpy(), reference.coef_, atol=1e-3)
    # what the head computes on every pooled case equals the pooled ridge's prediction; the
    # intercept alone is less exact, since SecAgg+ quantisation error in the Gram matrix moves
    # it along the mean feature direction (ill-conditioned) while the predictions stay put
    ours = pooled @ head.weight.double().numpy().T + head.bias.double().numpy()
    np.testing.assert_allclose(ours, reference.predict(pooled), atol=1e-3)
    np.testing.assert_allclose(head.bias.double().numpy(), reference.intercept_, atol=1e-2)
    assert isinstance(model, UniconModel)


@pytest.mark.parametrize(("nodes", "levels"), [(2, 2**30), (3, 2**29), (5, 2**28), (100, 2**24)])
def test_quantisation_range_cannot_overflow_the_modulus(nodes: int, levels: int) -> None:
    assert safe_quantization_range(nodes) == levels
    assert nodes * safe_quantization_range(nodes) < 2**32
