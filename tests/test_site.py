"""The hospital site: local training, DP accounting, budget refusal, replay, ClientApp."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant

from client.client_app import app as client_app
from client.data import CaseDataset, build_dataset
from client.errors import PrivacyBudgetExceeded
from client.losses import objective
from client.manifest import SiteManifest, load_manifest
from client.site import Site
from client.trainer import DPSettings, evaluate, train
from tests.conftest import tiny_plan
from unicon_model import protocol
from unicon_model.checkpoint import tensor_digest
from unicon_model.components import component_of_key, select_state
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, TaskSpec, validate_plan

DP = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)


def request_for(
    plan: Plan, stage: str, round_: int, model: UniconModel
) -> tuple[protocol.StageRequest, dict[str, torch.Tensor]]:
    """What the coordinator sends: every component of the model, with digests."""
    state = model.state_dict()
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        by_component.setdefault(component_of_key(key), {})[key] = value
    digests = {c: tensor_digest(t) for c, t in by_component.items()}
    request = protocol.StageRequest(
        plan=plan, stage=stage, server_round=round_, run="run-1", digests=digests
    )
    return request, dict(state)


def ct_training_cases(
    manifest: SiteManifest, plan: Plan, tasks: Mapping[str, TaskSpec]
) -> CaseDataset:
    """The site's CT training cases, labelled for ``tasks``."""
    return build_dataset(
        manifest,
        split="train",
        modality=plan.modalities_until(0)["ct"],
        tasks=tasks,
        data=plan.data,
    )


def test_one_local_round_lowers_the_training_loss(sites_dir: Path, plan: Plan) -> None:
    # Prepare: the foundation stage on one site's training cases
    manifest = load_manifest(sites_dir / "hospital-a" / "manifest.yaml")
    stage = plan.stages[0].model_copy(
        update={
            "local_epochs": 8,
            "optimizer": plan.stages[0].optimizer.model_copy(update={"lr": 0.001}),
        }
    )
    model = UniconModel.from_plan(plan, through_stage=0)
    tasks = plan.tasks_until(0)
    data = ct_training_cases(manifest, plan, tasks)
    batch = {k: torch.stack([s[k] for s in data.samples]) for k in data.samples[0]}
    before, _ = objective(model, batch, tasks, modality="ct")
    # Execute
    result = train(model, stage, data, tasks=tasks, seed=0)
    after, _ = objective(model, batch, tasks, modality="ct")
    # Assert: the loss on the training cases went down, and only the trained subset returns
    assert float(after) < 0.9 * float(before)
    assert set(result.update) == set(select_state(model, stage.trained_components))
    assert result.num_examples == len(data) > 0


def test_training_is_deterministic_with_a_seed(sites_dir: Path, plan: Plan) -> None:
    manifest = load_manifest(sites_dir / "hospital-b" / "manifest.yaml")
    tasks = plan.tasks_until(0)
    data = ct_training_cases(manifest, plan, tasks)
    updates = []
    for _ in range(2):
        model = UniconModel.from_plan(plan, through_stage=0)
        updates.append(train(model, plan.stages[0], data, tasks=tasks, seed=3).update)
    for key in updates[0]:
        assert torch.equal(updates[0][key], updates[1][key]), key


def test_dp_training_of_a_model_left_in_eval_mode(sites_dir: Path, plan: Plan) -> None:
    # Prepare: a model just evaluated (eval mode), which Opacus refuses to wrap
    manifest = load_manifest(sites_dir / "hospital-b" / "manifest.yaml")
    tasks = plan.tasks_until(0)
    data = ct_training_cases(manifest, plan, tasks)
    model = UniconModel.from_plan(plan, through_stage=0)
    evaluate(model, data, tasks=tasks)
    assert not model.training
    # Execute
    result = train(model, plan.stages[0], data, tasks=tasks, seed=1, privacy=DP)
    # Assert: it trained privately and changed the weights it returned
    before = select_state(UniconModel.from_plan(plan, through_stage=0), ("backbone",))
    assert any(not torch.equal(result.update[k], before[k]) for k in before)


def test_evaluation_metrics_match_references(sites_dir: Path, plan: Plan) -> None:
    from sklearn.metrics import accuracy_score

    manifest = load_manifest(sites_dir / "hospital-a" / "manifest.yaml")
    tasks = plan.tasks_until(2)
    model = UniconModel.from_plan(plan, through_stage=2)
    data = ct_training_cases(manifest, plan, tasks)
    metrics = evaluate(model, data, tasks=tasks)
    with torch.no_grad():
        images = torch.stack([s["image"] for s in data.samples])
        logits = model(images, modality="ct", task="lesion-class")
    labels = [int(s["lesion-class:label"]) for s in data.samples]
    assert metrics["lesion-class/accuracy"] == pytest.approx(
        accuracy_score(labels, logits.argmax(1).numpy())
    )
    assert 0.0 <= metrics["lesion-seg/dice"] <= 1.0
    assert 0.0 <= metrics["survival/cindex"] <= 1.0
    assert metrics["lesion-class/n"] == len(data)


def _dp_plan(max_rounds: int = 2) -> Plan:
    raw = tiny_plan()
    raw["stages"][0]["privacy"] = {
        "mode": "local",
        "target_epsilon": 4.0,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
    }
    raw["stages"][0]["rounds"] = max_rounds
    return validate_plan(raw)


def test_dp_training_spends_what_opacus_accountant_says(sites_dir: Path, tmp_path: Path) -> None:
    # Prepare: a DP stage of two rounds at one site
    plan = _dp_plan()
    site = Site(manifest_path=sites_dir / "hospital-a" / "manifest.yaml", state_dir=tmp_path)
    model = UniconModel.from_plan(plan, through_stage=0)
    # Execute: two rounds
    for round_ in (1, 2):
        request, arrays = request_for(plan, "foundation", round_, model)
        reply = site.train(request, arrays)
        model.load_state_dict({**model.state_dict(), **reply.arrays})
    # Assert: the site's epsilon equals an Opacus RDP accountant fed the same steps
    entries = site.ledger.entries()
    assert len(entries) == 2
    accountant = RDPAccountant()
    for entry in entries:
        for _ in range(entry["steps"]):
            accountant.step(
                noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"]
            )
    expected = accountant.get_epsilon(delta=1e-5)
    assert site.epsilon() == pytest.approx(expected, rel=1e-9)
    assert 0.9 * 4.0 <= site.epsilon() <= 4.0  # the stage's target over all its rounds
    assert json.loads(reply.config[protocol.KEY_EPSILON]) == pytest.approx(expected, abs=1e-5)


_FIRST_ROUND = """
import sys, torch
from pathlib import Path
from tests.test_site import _dp_plan, request_for
from client.site import Site
from unicon_model.model import UniconModel
plan = _dp_plan()
site = Site(manifest_path=sys.argv[1], state_dir=sys.argv[2], policy_path=sys.argv[3])
request, arrays = request_for(plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0))
site.train(request, arrays)
print(site.epsilon())
"""


def test_budget_refusal_after_a_site_restart(sites_dir: Path, tmp_path: Path) -> None:
    # Prepare: a policy whose cap allows one round of the stage, not two
    plan = _dp_plan()
    policy = tmp_path / "policy.toml"
    policy.write_text("max_epsilon = 3.5\ndelta = 1e-5\n")
    manifest = sites_dir / "hospital-a" / "manifest.yaml"
    state = tmp_path / "state"
    root = Path(__file__).resolve().parents[1]
    # Execute: round 1 in another process, which then exits (the daemon restarts)
    first = subprocess.run(
        [sys.executable, "-c", _FIRST_ROUND, str(manifest), str(state), str(policy)],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    spent = float(first.stdout.strip().splitlines()[-1])
    # Assert: a fresh Site on the same state directory sees the spending and refuses round 2
    site = Site(manifest_path=manifest, state_dir=state, policy_path=policy)
    assert site.epsilon() == pytest.approx(spent)
    request, arrays = request_for(
        plan, "foundation", 2, UniconModel.from_plan(plan, through_stage=0)
    )
    with pytest.raises(PrivacyBudgetExceeded, match=r"max_epsilon = 3\.5"):
        site.train(request, arrays)
    assert len(site.ledger.entries()) == 1
    assert any(e.event == "refused" for e in site.audit.entries())
    assert site.audit.verify().ok


def test_a_replayed_request_returns_the_stored_reply_without_spending(
    sites_dir: Path, tmp_path: Path
) -> None:
    plan = _dp_plan()
    site = Site(manifest_path=sites_dir / "hospital-b" / "manifest.yaml", state_dir=tmp_path)
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    first = site.train(request, arrays)
    spent = site.epsilon()
    again = site.train(request, arrays)
    assert all(torch.equal(first.arrays[k], again.arrays[k]) for k in first.arrays)
    assert site.epsilon() == spent
    served = [e.event for e in site.audit.entries() if e.event != "ledger"]  # ledger anchors
    assert served == ["train", "train-replay"]


def _message(
    message_type: str,
    request: protocol.StageRequest | None,
    arrays: dict[str, torch.Tensor] | None = None,
) -> Message:
    content = RecordDict()
    if request is not None:
        content[protocol.CONFIG] = ConfigRecord(request.to_config())
        content[protocol.ARRAYS] = ArrayRecord(arrays or {})
    return Message(content, dst_node_id=1, message_type=message_type)


def _context(sites_dir: Path, state: Path) -> Context:
    node = {"manifest": str(sites_dir / "hospital-a" / "manifest.yaml"), "state-dir": str(state)}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_client_app_query_train_evaluate_and_cache(sites_dir: Path, tmp_path: Path) -> None:
    plan = validate_plan(tiny_plan())
    context = _context(sites_dir, tmp_path)
    model = UniconModel.from_plan(plan, through_stage=0)
    # query: capabilities
    reply = client_app(_message("query", None), context)
    capabilities = json.loads(str(reply.content.config_records["config"]["capabilities"]))
    assert capabilities["site"] == "hospital-a"
    assert set(capabilities["tasks"]) == {"lesion-class", "survival", "lesion-seg", "organ-seg"}
    assert capabilities["modalities"] == ["ct", "pet"]
    # train: only the stage's trained components come back
    request, arrays = request_for(plan, "foundation", 1, model)
    reply = client_app(_message("train", request, arrays), context)
    assert not reply.has_error(), reply.error
    returned = reply.content.array_records["arrays"].to_torch_state_dict()
    assert {component_of_key(k) for k in returned} == {
        "backbone",
        "modality/ct",
        "task/lesion-class",
    }
    assert reply.content.metric_records["metrics"]["num-examples"] > 0
    # evaluate with components referenced only by digest: served from the site's cache
    request, _ = request_for(plan, "foundation", 1, model)
    evaluation = protocol.StageRequest(**{**request.__dict__, "split": "test"})
    reply = client_app(_message("evaluate", evaluation, {}), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert "lesion-class@ct/accuracy" in metrics and "lesion-class@pet/accuracy" not in metrics
    # a digest the site never received: an error reply naming the components to resend
    unknown = protocol.StageRequest(**{**evaluation.__dict__, "digests": {"backbone": "0" * 64}})
    reply = client_app(_message("evaluate", unknown, {}), context)
    assert reply.has_error() and reply.error.code == protocol.ERROR_CACHE_MISS
    assert json.loads(reply.error.reason) == ["backbone"]


def test_client_app_refuses_a_stage_the_policy_forbids(sites_dir: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_tasks = ["lesion-class"]\n')
    node = {
        "manifest": str(sites_dir / "hospital-a" / "manifest.yaml"),
        "state-dir": str(tmp_path / "state"),
        "policy": str(policy),
    }
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    plan = validate_plan(tiny_plan())
    request, arrays = request_for(
        plan, "prognosis", 1, UniconModel.from_plan(plan, through_stage=1)
    )
    reply = client_app(_message("train", request, arrays), context)
    assert reply.has_error() and reply.error.code == protocol.ERROR_REFUSED
    assert "task 'survival' is not allowed" in reply.error.reason
