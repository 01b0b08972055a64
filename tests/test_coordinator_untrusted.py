"""The coordinator survives faulty or malicious sites (issue 12), over a fake transport.

Every site here is a few lines of Python (no training, no images), so each test runs a whole
stage in well under a second. Honest sites move every trained value by a fixed offset, so the
expected FedAvg is computed by hand: ``sent + Σ wᵢ·dᵢ / Σ wᵢ``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.coordinator import Coordinator
from server.errors import StageError
from server.registry import Registry
from server.round_checks import check_num_examples, parse_epsilon
from server.rounds import fedavg as coordinator_module
from server.secure_aggregation import SecureResult
from server.transport import Incoming, Outgoing
from tests.conftest import tiny_plan
from unicon_model import protocol
from unicon_model.analytic import AnalyticHead, RidgeStatistics, merge_statistics
from unicon_model.components import key_prefix, select_state
from unicon_model.layers import pooled_size
from unicon_model.schema import Plan, SecureAggregationSpec, validate_plan

TRAIN_CASES = 10
"""Train cases every fake site reports in its capabilities."""

Tamper = Callable[[Incoming], Incoming]


def capabilities(site: str, **changes: Any) -> dict[str, Any]:
    """Capabilities of an honest site with ``TRAIN_CASES`` CT train cases."""
    split = {"train": TRAIN_CASES, "val": 2, "test": 2}
    caps: dict[str, Any] = {
        "site": site,
        "tasks": {"lesion-class": "classification", "ridge": "classification"},
        "modalities": ["ct"],
        "counts": {
            "cases": dict(split),
            "tasks": {"lesion-class": dict(split), "ridge": dict(split)},
            "modalities": {"ct": dict(split)},
            "classes": {},
        },
        "policy": {},
        "epsilon": 0.0,
    }
    caps.update(changes)
    return caps


@dataclasses.dataclass
class FakeSite:
    """One node: its capabilities (an object, or raw JSON text), its offset and weight."""

    caps: Any
    offset: float = 0.01
    weight: float = 4.0
    tamper: Tamper | None = None
    features: np.ndarray | None = None
    labels: np.ndarray | None = None


class FakeTransport:
    """Sites as functions: honest by default, each reply optionally tampered with."""

    def __init__(self, plan: Plan, sites: dict[int, FakeSite]) -> None:
        self.plan = plan
        self.sites = sites
        self.sent: list[Outgoing] = []
        self.secure_calls: list[list[int]] = []
        self.secure_plan: list[tuple[dict[int, float], float]] = []
        """Per SecAgg+ call: the weights it reveals and the value of every mean entry."""
        self.secure_sent: list[dict[str, torch.Tensor]] = []
        self.secure_shapes: dict[str, Any] = {}

    def node_ids(self) -> list[int]:
        return list(self.sites)

    def exchange(self, messages: Sequence[Outgoing], *, timeout: float) -> list[Incoming]:
        # copies, as serialisation would make: the coordinator's tensors change in place later
        copies = [
            dataclasses.replace(m, arrays={k: v.clone() for k, v in m.arrays.items()})
            for m in messages
        ]
        self.sent.extend(copies)
        return [self._reply(m) for m in copies]

    def _reply(self, message: Outgoing) -> Incoming:
        site = self.sites[message.node_id]
        if message.message_type == "query":
            caps = site.caps if isinstance(site.caps, str) else json.dumps(site.caps)
            return Incoming(message.node_id, config={protocol.KEY_CAPABILITIES: caps})
        config = {protocol.KEY_CACHED: "[]", protocol.KEY_EPSILON: 0.0}
        if message.message_type == "evaluate":
            return Incoming(message.node_id, metrics={protocol.KEY_NUM_EXAMPLES: 2.0})
        stage = self.plan.stages[[s.name for s in self.plan.stages].index(message.config["stage"])]
        if stage.is_analytic:
            assert site.features is not None and site.labels is not None
            stats = RidgeStatistics.from_data(site.features, site.labels).to_arrays()
            arrays = {f"ridge/{k}": torch.from_numpy(v) for k, v in stats.items()}
        else:
            prefixes = tuple(key_prefix(c) for c in stage.trained_components)
            arrays = {
                k: v + site.offset
                for k, v in message.arrays.items()
                if k.startswith(prefixes) and v.is_floating_point()
            }
        reply = Incoming(
            message.node_id,
            arrays=arrays,
            metrics={protocol.KEY_NUM_EXAMPLES: site.weight, "loss": 0.5},
            config=config,
        )
        return site.tamper(reply) if site.tamper else reply

    def secure_weighted_mean(self, nodes: Sequence[int], **kwargs: Any) -> SecureResult:
        self.secure_calls.append(list(nodes))
        self.secure_sent.append({k: v.clone() for k, v in kwargs["arrays"].items()})
        self.secure_shapes = dict(kwargs["reply_shapes"])
        weights, value = self.secure_plan.pop(0)
        mean = {
            k: torch.full(tuple(shape), value, dtype=torch.float64)
            for k, shape in self.secure_shapes.items()
        }
        return SecureResult(mean=mean, num_examples=weights, metrics={n: {} for n in weights})


def one_stage_plan(**stage: Any) -> Plan:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(rounds=1, **stage)
    return validate_plan(raw)


def sent_state(transport: FakeTransport, plan: Plan) -> dict[str, torch.Tensor]:
    """The trained values the coordinator sent in its first train request."""
    first = next(m for m in transport.sent if m.message_type == "train")
    prefixes = tuple(key_prefix(c) for c in plan.stages[0].trained_components)
    return {k: v for k, v in first.arrays.items() if k.startswith(prefixes)}


def committed_state(registry: Registry, plan: Plan) -> dict[str, torch.Tensor]:
    model, _ = registry.load(registry.versions()[-1])
    return select_state(model, plan.stages[0].trained_components)


def round_records(registry: Registry, plan: Plan) -> list[dict[str, Any]]:
    return [m for m in registry.metrics(plan.name) if m["kind"] == "round"]


def with_metrics(**metrics: Any) -> Tamper:
    def tamper(reply: Incoming) -> Incoming:
        merged = {**reply.metrics, **metrics}
        return dataclasses.replace(reply, metrics={k: v for k, v in merged.items() if v != "drop"})

    return tamper


def with_config(**config: Any) -> Tamper:
    return lambda reply: dataclasses.replace(reply, config={**reply.config, **config})


def scaled(factor: float) -> Tamper:
    return lambda r: dataclasses.replace(r, arrays={k: v * factor for k, v in r.arrays.items()})


BAD_REPLIES = {
    "nan-examples": (with_metrics(**{"num-examples": math.nan}), "is not a finite number"),
    "huge-examples": (
        with_metrics(**{"num-examples": 1e12}),
        f"exceeds the {TRAIN_CASES} train case(s) the site reported",
    ),
    "negative-examples": (with_metrics(**{"num-examples": -5.0}), "-5 is not positive"),
    "missing-examples": (with_metrics(**{"num-examples": "drop"}), "has no num-examples"),
    "text-metric": (with_metrics(loss="low"), "metrics ['loss'] are not numbers"),
    "bad-cached": (with_config(cached="[not json"), "cached is not valid JSON"),
    "cached-not-list": (with_config(cached='{"a": 1}'), "cached must be a list"),
    "epsilon-text": (with_config(epsilon="abc"), "epsilon is not valid JSON"),
    "epsilon-nan": (with_config(epsilon="NaN"), "epsilon must be a finite number >= 0"),
    "epsilon-negative": (with_config(epsilon=-1.0), "epsilon must be a finite number >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_malformed_train_reply_drops_only_that_site(tmp_path: Path, case: str) -> None:
    # Prepare: a (weight 4, +0.01) and b (weight 6, +0.03) are honest; c is faulty
    tamper, reason = BAD_REPLIES[case]
    plan = one_stage_plan()
    sites = {
        1: FakeSite(capabilities("site-a"), offset=0.01, weight=4.0),
        2: FakeSite(capabilities("site-b"), offset=0.03, weight=6.0),
        3: FakeSite(capabilities("site-c"), offset=5.0, weight=9.0, tamper=tamper),
    }
    transport = FakeTransport(plan, sites)
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: c is rejected with the reason; the model is FedAvg of a and b only, finite
    (record,) = round_records(registry, plan)
    assert list(record["rejected"]) == ["site-c"]
    assert reason in record["rejected"]["site-c"]
    assert record["sites"] == ["site-a", "site-b"] and record["num_examples"] == 10.0
    sent, committed = sent_state(transport, plan), committed_state(registry, plan)
    assert set(committed) == set(sent)
    for key, value in sent.items():
        # (4·0.01 + 6·0.03) / 10 = 0.022
        torch.testing.assert_close(committed[key], value + 0.022, rtol=0, atol=1e-6)
        assert bool(committed[key].isfinite().all())


def test_an_update_of_norm_1e30_is_rejected_with_only_two_sites(tmp_path: Path) -> None:
    plan = one_stage_plan()
    sites = {
        1: FakeSite(capabilities("site-a"), offset=0.01, weight=4.0),
        2: FakeSite(capabilities("site-b"), offset=1e30, weight=6.0),
    }
    transport = FakeTransport(plan, sites)
    registry = Registry(tmp_path / "registry")
    Coordinator(plan, registry, transport, site_wait=0).run()
    (record,) = round_records(registry, plan)
    assert "exceeds the stage's max_update_norm 1000" in record["rejected"]["site-b"]
    sent, committed = sent_state(transport, plan), committed_state(registry, plan)
    for key, value in sent.items():
        torch.testing.assert_close(committed[key], value + 0.01, rtol=0, atol=1e-6)


def test_the_plans_max_update_norm_is_used(tmp_path: Path) -> None:
    # one site moving each of its values by 0.01 has a norm of 0.01·sqrt(#values) > 1e-3
    plan = one_stage_plan(max_update_norm=1e-3)
    transport = FakeTransport(plan, {1: FakeSite(capabilities("site-a"))})
    registry = Registry(tmp_path / "registry")
    with pytest.raises(StageError, match=r"max_update_norm 0\.001"):
        Coordinator(plan, registry, transport, site_wait=0).run()
    assert registry.versions() == []


BAD_CAPABILITIES = {
    "not-json": ("{not json", "capabilities is not valid JSON"),
    "not-an-object": ("[1, 2]", "capabilities must be a JSON object, got list"),
    "no-site": (
        {k: v for k, v in capabilities("x").items() if k != "site"},
        "capabilities have no 'site' name",
    ),
    "bad-site-name": (capabilities("../evil"), "site name '../evil' is not a valid name"),
    "bidi-site-name": (capabilities("site\u202ed"), "is not a valid name"),
    "epsilon-text": (capabilities("site-d", epsilon="abc"), "epsilon must be a finite number"),
    "epsilon-nan": ('{"site": "site-d", "epsilon": NaN}', "epsilon must be a finite number"),
    "epsilon-inf": ('{"site": "site-d", "epsilon": Infinity}', "epsilon must be a finite number"),
    "epsilon-negative": (capabilities("site-d", epsilon=-1), "epsilon must be a finite number"),
    "bad-count": (
        capabilities("site-d", counts={"cases": {"train": "many"}}),
        "counts.cases.train must be a non-negative whole number",
    ),
    "deep": ("[" * 100_000 + "]" * 100_000, "capabilities is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_CAPABILITIES))
def test_a_malformed_query_reply_makes_that_node_ineligible(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw, reason = BAD_CAPABILITIES[case]
    plan = one_stage_plan()
    sites = {
        1: FakeSite(capabilities("site-a"), offset=0.01, weight=4.0),
        2: FakeSite(capabilities("site-b"), offset=0.03, weight=6.0),
        3: FakeSite(raw),
    }
    transport = FakeTransport(plan, sites)
    registry = Registry(tmp_path / "registry")
    coordinator = Coordinator(plan, registry, transport, site_wait=0)
    with caplog.at_level(logging.WARNING, logger="server.coordinator"):
        coordinator.run()
    # node 3 got no work, its reason is kept and logged, the others trained
    assert {m.node_id for m in transport.sent if m.message_type != "query"} == {1, 2}
    assert any(reason in r for r in coordinator.refused[3].reasons)
    assert f"node 3 ({coordinator.refused[3].site}) is ineligible" in caplog.text
    (record,) = round_records(registry, plan)
    assert record["sites"] == ["site-a", "site-b"]


def test_too_few_sites_after_refusals_names_every_reason(tmp_path: Path) -> None:
    plan = one_stage_plan(min_sites=2)
    sites = {1: FakeSite(capabilities("site-a")), 2: FakeSite("{not json")}
    registry = Registry(tmp_path / "registry")
    with pytest.raises(StageError, match=r"found 1 .*node-2: capabilities is not valid JSON"):
        Coordinator(plan, registry, FakeTransport(plan, sites), site_wait=0).run()
    assert registry.versions() == []


def test_duplicate_site_names_are_all_refused(tmp_path: Path) -> None:
    # nodes 1 and 4 both claim site-a: neither can be told genuine, both are refused
    plan = one_stage_plan()
    sites = {
        1: FakeSite(capabilities("site-a"), offset=0.5),
        2: FakeSite(capabilities("site-b"), offset=0.01, weight=4.0),
        3: FakeSite(capabilities("site-c"), offset=0.03, weight=6.0),
        4: FakeSite(capabilities("site-a"), offset=0.7),
    }
    transport = FakeTransport(plan, sites)
    registry = Registry(tmp_path / "registry")
    coordinator = Coordinator(plan, registry, transport, site_wait=0)
    coordinator.run()
    assert {m.node_id for m in transport.sent if m.message_type != "query"} == {2, 3}
    for node in (1, 4):
        (reason,) = coordinator.refused[node].reasons
        assert "site name 'site-a' is reported by nodes [1, 4]" in reason
    (record,) = round_records(registry, plan)
    assert record["sites"] == ["site-b", "site-c"]
    sent, committed = sent_state(transport, plan), committed_state(registry, plan)
    for key, value in sent.items():
        torch.testing.assert_close(committed[key], value + 0.022, rtol=0, atol=1e-6)
    assert registry.manifest(registry.versions()[-1]).lineage.sites == ["site-b", "site-c"]


def test_a_non_finite_merge_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a first stage commits; the second stage's merge is forced to NaN (validation
    # rejects NaN updates, so only a fault in aggregation itself can produce one)
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:2]
    for stage in raw["stages"]:
        stage["rounds"] = 1
    plan = validate_plan(raw)
    sites = {
        1: FakeSite(capabilities("site-a")),
        2: FakeSite(capabilities("site-b")),
    }
    for site in sites.values():
        site.caps["tasks"]["survival"] = "survival"
        site.caps["counts"]["tasks"]["survival"] = {"train": TRAIN_CASES, "val": 2, "test": 2}
    registry = Registry(tmp_path / "registry")
    Coordinator(plan, registry, FakeTransport(plan, sites), site_wait=0).run(
        only_stage="foundation"
    )
    before = registry.manifest("v0001-foundation")
    progress_before = registry.progress(plan.name)
    real = coordinator_module.weighted_average

    def nan_average(updates: Any, weights: Any) -> dict[str, torch.Tensor]:
        return {k: torch.full_like(v, math.nan) for k, v in real(updates, weights).items()}

    monkeypatch.setattr(coordinator_module, "weighted_average", nan_average)
    # Execute
    with pytest.raises(StageError, match=r"round 1: the merged update has NaN/Inf"):
        Coordinator(plan, registry, FakeTransport(plan, sites), site_wait=0).run()
    # Assert: nothing new committed or checkpointed; the previous version is intact
    assert registry.versions() == ["v0001-foundation"]
    assert registry.manifest("v0001-foundation") == before
    progress = registry.progress(plan.name)
    assert progress.completed_stages == progress_before.completed_stages == ["foundation"]
    assert progress.current == progress_before.current
    assert [m["stage"] for m in round_records(registry, plan)] == ["foundation"]
    model, _ = registry.load("v0001-foundation")
    assert all(bool(v.isfinite().all()) for v in model.state_dict().values())


def test_the_finite_check_names_the_bad_tensors() -> None:
    state = {"a": torch.zeros(2), "b": torch.tensor([1.0, math.inf]), "c": torch.zeros(1)}
    with pytest.raises(StageError, match=r"merge has NaN/Inf in 1 tensor\(s\), e.g. \['b'\]"):
        Coordinator._require_finite(state, "the merge")
    Coordinator._require_finite({"a": torch.zeros(2)}, "the merge")


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        ({}, "has no num-examples"),
        ({"num-examples": math.nan}, "nan is not a finite number"),
        ({"num-examples": math.inf}, "inf is not a finite number"),
        ({"num-examples": True}, "True is not a finite number"),
        ({"num-examples": "5"}, "'5' is not a finite number"),
        ({"num-examples": 0.0}, "0 is not positive"),
        ({"num-examples": 11.0}, "11 exceeds the 10 train case(s)"),
        ({"num-examples": 10.0}, ""),
    ],
)
def test_num_examples_rule(metrics: dict[str, Any], problem: str) -> None:
    found = check_num_examples(metrics, 10)
    assert (problem in found) if problem else found == ""


def test_epsilon_rule() -> None:
    assert parse_epsilon(0.5) == (0.5, "")
    assert parse_epsilon("1.5") == (1.5, "")
    for bad in ("abc", "NaN", "Infinity", -1.0, "[1]", True, None):
        value, problem = parse_epsilon(bad)
        assert value is None and "epsilon" in problem, bad


# ---------------------------------------------------------------------------- analytic
def analytic_plan() -> Plan:
    raw = tiny_plan()
    raw["stages"] = [
        {**raw["stages"][0], "rounds": 1},
        {
            "name": "ridge",
            "add_tasks": [
                {
                    "name": "ridge",
                    "kind": "classification",
                    "classes": ["benign", "malignant"],
                    "head": "analytic",
                    "l2": 0.5,
                }
            ],
            "rounds": 1,
        },
    ]
    return validate_plan(raw)


def ridge_site(name: str, seed: int, n: int = 6, **kwargs: Any) -> FakeSite:
    plan = analytic_plan()
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, pooled_size(plan.model.widths)))
    labels = np.eye(2)[rng.integers(0, 2, n)]
    return FakeSite(capabilities(name), weight=float(n), features=features, labels=labels, **kwargs)


def test_analytic_round_rejects_bad_counts_and_statistics(tmp_path: Path) -> None:
    # Prepare: a and b honest; c claims 1e12 examples; d sends a Gram matrix of a wrong shape
    plan = analytic_plan()

    def bad_gram(reply: Incoming) -> Incoming:
        return dataclasses.replace(
            reply, arrays={**reply.arrays, "ridge/gram": torch.zeros(2, 2, dtype=torch.float64)}
        )

    sites = {
        1: ridge_site("site-a", 1),
        2: ridge_site("site-b", 2),
        3: ridge_site("site-c", 3, tamper=with_metrics(**{"num-examples": 1e12})),
        4: ridge_site("site-d", 4, tamper=bad_gram),
    }
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, FakeTransport(plan, sites), site_wait=0).run()
    # Assert: the head is the ridge solution of a's and b's statistics only
    record = round_records(registry, plan)[-1]
    assert "exceeds the 10 train case(s)" in record["rejected"]["site-c"]
    assert "ridge/gram: shape (2, 2)" in record["rejected"]["site-d"]
    assert record["sites"] == ["site-a", "site-b"] and record["num_examples"] == 12.0
    honest = [RidgeStatistics.from_data(s.features, s.labels) for s in (sites[1], sites[2])]
    weight, bias = merge_statistics(honest).solve(l2=0.5)
    model, _ = registry.load(registry.versions()[-1])
    head = model.tasks["ridge"]
    assert isinstance(head, AnalyticHead)
    np.testing.assert_allclose(head.weight.double().numpy(), weight.T, atol=1e-5)
    np.testing.assert_allclose(head.bias.double().numpy(), bias, atol=1e-5)


# ---------------------------------------------------------------------------- secure
def test_secure_round_repeats_without_a_site_whose_weight_is_invalid(tmp_path: Path) -> None:
    # Prepare: the first SecAgg+ run shows node 3 with 1e12 examples (its weight skews the
    # mean), the repeat over nodes 1 and 2 gives a valid mean change of 0.02
    plan = one_stage_plan(
        secure_aggregation=True,
        min_sites=2,
        secagg=SecureAggregationSpec(num_shares=2, reconstruction_threshold=2).model_dump(),
    )
    sites = {n: FakeSite(capabilities(f"site-{c}")) for n, c in zip((1, 2, 3), "abc", strict=True)}
    transport = FakeTransport(plan, sites)
    transport.secure_plan = [({1: 4.0, 2: 6.0, 3: 1e12}, 20.0), ({1: 4.0, 2: 6.0}, 0.02)]
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: the repeat's mean is applied; c is rejected with the reason
    assert transport.secure_calls == [[1, 2, 3], [1, 2]]
    (record,) = round_records(registry, plan)
    assert "1e+12 exceeds the 10 train case(s)" in record["rejected"]["site-c"]
    assert record["sites"] == ["site-a", "site-b"] and record["num_examples"] == 10.0
    sent = transport.secure_sent[0]
    committed = committed_state(registry, plan)
    assert set(committed) == set(transport.secure_shapes)
    for key, value in committed.items():
        torch.testing.assert_close(value, sent[key] + 0.02, rtol=0, atol=1e-6)


def test_a_secure_mean_above_max_update_norm_is_discarded(tmp_path: Path) -> None:
    plan = one_stage_plan(
        secure_aggregation=True,
        min_sites=2,
        secagg=SecureAggregationSpec(num_shares=2, reconstruction_threshold=2).model_dump(),
    )
    sites = {n: FakeSite(capabilities(f"site-{c}")) for n, c in zip((1, 2), "ab", strict=True)}
    transport = FakeTransport(plan, sites)
    transport.secure_plan = [({1: 4.0, 2: 6.0}, 1e6)]
    registry = Registry(tmp_path / "registry")
    with pytest.raises(StageError, match="above the stage's max_update_norm 1000"):
        Coordinator(plan, registry, transport, site_wait=0).run()
    assert registry.versions() == [] and round_records(registry, plan) == []
