"""Issue 12, site side: secret DP noise, paths, stored replies, cache, evaluate policy, modes.

Training is replaced by a fast stand-in where the test is about the site's bookkeeping; the
trainer's secret noise is tested on a tiny linear model.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import client.site as site_module
from client.dp import make_private
from client.errors import RequestRefused
from client.site import Site
from client.trainer import TrainResult, secret_generator
from tests.conftest import tiny_plan
from tests.test_site import request_for
from unicon_model import protocol
from unicon_model.components import select_state
from unicon_model.model import UniconModel
from unicon_model.names import UnsafeNameError
from unicon_model.schema import Plan, validate_plan


def _dp_plan() -> Plan:
    raw = tiny_plan()
    raw["stages"][0]["privacy"] = {
        "mode": "local",
        "target_epsilon": 4.0,
        "delta": 1e-5,
        "max_grad_norm": 1.0,
    }
    return validate_plan(raw)


class FakeTrain:
    """Stands in for :func:`client.trainer.train`: records seeds, returns fresh noise."""

    def __init__(self) -> None:
        self.seeds: list[int | None] = []

    def __call__(self, model: nn.Module, stage: Any, dataset: Any, **kw: Any) -> TrainResult:
        self.seeds.append(kw["seed"])
        update = {
            k: v + torch.randn(v.shape, generator=secret_generator())
            for k, v in select_state(model, stage.trained_components).items()
        }
        return TrainResult(update, len(dataset), 1, 0.5, {"loss": 1.0})


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> FakeTrain:
    """Fast stand-ins for training and for the (slow) noise calibration of a DP stage."""
    fake = FakeTrain()
    monkeypatch.setattr(site_module, "train", fake)
    monkeypatch.setattr(site_module, "stage_noise_multiplier", lambda **_: 1.0)
    return fake


def _site(sites_dir: Path, state: Path, name: str = "hospital-a", **kw: Any) -> Site:
    return Site(manifest_path=sites_dir / name / "manifest.yaml", state_dir=state, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------- 1. DP noise
def test_secret_generators_differ_and_fill_the_whole_state() -> None:
    # Prepare / Execute
    a, b = secret_generator(), secret_generator()
    seeded = torch.Generator().manual_seed(a.initial_seed())
    # Assert: not derivable from the seed, and two draws differ
    assert not torch.equal(a.get_state(), seeded.get_state())
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    assert a.initial_seed() != b.initial_seed()


def _noisy_step(generator: torch.Generator) -> torch.Tensor:
    """One DP-SGD step of a tiny linear model from fixed weights; returns the weights."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.ones(4, 3), torch.zeros(4, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    net, opt, loader = make_private(
        model,
        optimizer,
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        generator=generator,
    )
    x, y = next(iter(loader))
    opt.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()
    net.to_standard_module()
    return model.weight.detach().clone()


def test_dp_noise_from_secret_generators_is_not_reproducible() -> None:
    # Execute: the same step twice with secret generators, twice with one explicit seed
    secret = [_noisy_step(secret_generator()) for _ in range(2)]
    seeded = [_noisy_step(torch.Generator().manual_seed(5)) for _ in range(2)]
    # Assert
    assert not torch.equal(secret[0], secret[1])
    assert torch.equal(seeded[0], seeded[1])


def test_two_identical_sites_draw_secret_dp_seeds_and_a_replay_is_bit_identical(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain
) -> None:
    # Prepare: two sites with the same name and data, the same DP request
    plan = _dp_plan()
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    first, twin = _site(sites_dir, tmp_path / "a"), _site(sites_dir, tmp_path / "b")
    # Execute
    a = first.train(request, arrays)
    b = twin.train(request, arrays)
    replay = first.train(request, arrays)
    # Assert: nothing from the request seeds DP training; updates differ; replay is bitwise
    assert fake_train.seeds == [None, None]
    assert any(not torch.equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert all(torch.equal(a.arrays[k], replay.arrays[k]) for k in a.arrays)
    assert _without_timing(replay.metrics) == _without_timing(a.metrics)
    assert len(first.ledger.entries()) == 1


def test_non_private_training_keeps_the_request_derived_seed(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain, plan: Plan
) -> None:
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    _site(sites_dir, tmp_path / "a").train(request, arrays)
    _site(sites_dir, tmp_path / "b").train(request, arrays)
    assert fake_train.seeds[0] is not None and fake_train.seeds[0] == fake_train.seeds[1]


# ------------------------------------------------------------------------- 2. paths
@pytest.mark.parametrize("run", ["../../x", "/tmp/evil", "a\n", "run\u200b1", "run\u202e1"])
def test_a_run_that_is_not_a_name_is_refused_and_writes_nothing_outside(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain, plan: Plan, run: str
) -> None:
    # Prepare
    state = tmp_path / "deep" / "state"
    site = _site(sites_dir, state)
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    bad = protocol.StageRequest(**{**request.__dict__, "run": run})
    # Execute / Assert
    with pytest.raises(UnsafeNameError, match="run"):
        site.train(bad, arrays)
    assert fake_train.seeds == []
    outside = [p for p in tmp_path.rglob("*") if state not in (p, *p.parents)]
    assert outside == [tmp_path / "deep"]
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- 3. stored replies
@pytest.mark.parametrize("damage", ["truncate-tensors", "bad-json", "no-digest"])
def test_a_torn_stored_reply_is_logged_and_recomputed(
    sites_dir: Path,
    tmp_path: Path,
    fake_train: FakeTrain,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    # Prepare: a served request (DP in one case) whose stored reply is then damaged
    dp = damage == "truncate-tensors"
    plan = _dp_plan() if dp else validate_plan(tiny_plan())
    site = _site(sites_dir, tmp_path)
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    site.train(request, arrays)
    (tensors,) = (tmp_path / "replies").glob("*.safetensors")
    meta = tensors.with_suffix(".json")
    if damage == "truncate-tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "bad-json":
        meta.write_text('{"key": ')
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "digest": None}))
    # Execute
    reply = site.train(request, arrays)
    again = site.train(request, arrays)
    # Assert: recomputed once, stored again, the new release recorded under a new key
    assert len(fake_train.seeds) == 2
    assert "unusable" in caplog.text
    assert all(torch.equal(reply.arrays[k], again.arrays[k]) for k in reply.arrays)
    keys = [e["key"] for e in site.ledger.entries()]
    if dp:
        assert len(keys) == 2 and keys[1] == f"{keys[0]}#retrain-1"
    else:
        assert keys == []


def test_stored_replies_and_cache_entries_are_private_files(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain, plan: Plan
) -> None:
    state = tmp_path / "state"
    site = _site(sites_dir, state)
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    site.train(request, arrays)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for folder in ("replies", "components"):
        assert stat.S_IMODE((state / folder).stat().st_mode) == 0o700
        files = list((state / folder).iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert not list((state / "replies").glob(".tmp-*"))


# ------------------------------------------------------------------------- 4. cache
def test_a_refused_request_caches_no_component(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain
) -> None:
    # Prepare: a policy refusing the prognosis stage's survival task
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_tasks = ["lesion-class"]\n')
    site = _site(sites_dir, tmp_path / "state", policy_path=policy)
    plan = validate_plan(tiny_plan())
    request, arrays = request_for(
        plan, "prognosis", 1, UniconModel.from_plan(plan, through_stage=1)
    )
    # Execute / Assert
    with pytest.raises(RequestRefused, match="survival"):
        site.train(request, arrays)
    assert site.cache.digests() == []
    assert fake_train.seeds == []


def test_a_request_refused_for_budget_caches_no_component(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("max_epsilon = 0.01\n")
    site = _site(sites_dir, tmp_path / "state", policy_path=policy)
    plan = _dp_plan()
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    with pytest.raises(RequestRefused):
        site.train(request, arrays)
    assert site.cache.digests() == []
    assert [e.event for e in site.audit.entries() if e.event != "ledger"] == ["refused"]


def test_the_site_cache_is_size_limited(
    sites_dir: Path, tmp_path: Path, fake_train: FakeTrain, plan: Plan
) -> None:
    site = _site(sites_dir, tmp_path, cache_max_bytes=1)
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    site.train(request, arrays)
    assert len(site.cache.digests()) == 1  # only the last put survives its own eviction
    assert _site(sites_dir, tmp_path / "d").cache.max_bytes == site_module.DEFAULT_MAX_BYTES


# ------------------------------------------------------------------------- 5. evaluate
def _evaluation(plan: Plan, split: str = "test") -> tuple[protocol.StageRequest, dict[str, Any]]:
    request, arrays = request_for(
        plan, "prognosis", 0, UniconModel.from_plan(plan, through_stage=1)
    )
    return protocol.StageRequest(**{**request.__dict__, "split": split}), arrays


def test_evaluate_refuses_the_train_split(sites_dir: Path, tmp_path: Path, plan: Plan) -> None:
    site = _site(sites_dir, tmp_path)
    request, arrays = _evaluation(plan, "train")
    with pytest.raises(RequestRefused, match=r"only the \['val', 'test'\] splits, not 'train'"):
        site.evaluate(request, arrays)
    assert [e.event for e in site.audit.entries() if e.event != "ledger"] == ["refused"]
    assert site.cache.digests() == []


def test_evaluate_leaves_out_tasks_the_policy_does_not_allow(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_tasks = ["lesion-class"]\n')
    site = _site(sites_dir, tmp_path / "s", policy_path=policy)
    request, arrays = _evaluation(plan)
    metrics = site.evaluate(request, arrays).metrics
    assert "lesion-class@ct/accuracy" in metrics
    assert not any(k.startswith("survival@") for k in metrics)
    (entry,) = [e for e in site.audit.entries() if e.event == "evaluate"]
    assert "allowed_tasks" in json.dumps(entry.record["skipped"])


def test_evaluate_refuses_when_the_policy_allows_no_route(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_modalities = ["mr"]\n')
    site = _site(sites_dir, tmp_path / "s", policy_path=policy)
    request, arrays = _evaluation(plan)
    with pytest.raises(RequestRefused, match="allows none of the modality routes"):
        site.evaluate(request, arrays)
    assert [e.event for e in site.audit.entries() if e.event != "ledger"] == ["refused"]


def test_evaluate_withholds_metrics_of_too_small_splits(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    site = _site(sites_dir, tmp_path, min_evaluation_cases=1000)
    request, arrays = _evaluation(plan)
    reply = site.evaluate(request, arrays)
    assert _without_timing(reply.metrics) == {protocol.KEY_NUM_EXAMPLES: 0.0}
    (entry,) = [e for e in site.audit.entries() if e.event == "evaluate"]
    assert "fewer than the minimum 1000" in entry.record["skipped"]["@ct"]
    with pytest.raises(ValueError, match="min_evaluation_cases"):
        _site(sites_dir, tmp_path / "x", min_evaluation_cases=0)


def test_the_site_policy_sets_the_evaluation_minimum(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("min_evaluation_cases = 1000\n")
    site = _site(sites_dir, tmp_path / "s", policy_path=policy)
    assert site.min_evaluation_cases == 1000
    request, arrays = _evaluation(plan)
    metrics = site.evaluate(request, arrays).metrics
    assert _without_timing(metrics) == {protocol.KEY_NUM_EXAMPLES: 0.0}


def test_a_deleted_ledger_fails_the_epsilon_report_closed(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    site = _site(sites_dir, tmp_path / "s")
    site.ledger.record(
        "k", noise_multiplier=1.0, sample_rate=0.1, steps=10, stage="x", round=1, run="r"
    )
    assert site.epsilon() > 0
    site.ledger.path.unlink()
    with pytest.raises(RequestRefused, match="Restore the ledger from a backup"):
        site.epsilon()
    with pytest.raises(RequestRefused):
        site.capabilities()


def _without_timing(metrics: dict[str, float]) -> dict[str, float]:
    """A reply's metrics without its per-request timings and cache counts (``time/``,
    ``count/``), which every serve measures anew, a replay included."""
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "count/"))}
