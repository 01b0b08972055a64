"""A site reloads the model of its previous request instead of building it again; the
replies are exactly those of a freshly built model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import client.site
from client.errors import SiteError
from client.site import Site
from tests.conftest import tiny_plan
from tests.test_site import request_for
from unicon_model.components import load_state
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan


@pytest.fixture
def plan() -> Plan:
    """The tiny plan with one local epoch of one batch per round (fast)."""
    raw = tiny_plan()
    for stage in raw["stages"]:
        stage.update(local_epochs=1, batch_size=16)
    return validate_plan(raw)


def _serve_two_rounds(site: Site, plan: Plan, *, fresh: bool) -> list[dict[str, float]]:
    """Train round 1, evaluate, train round 2 on the merged model; the updates and metrics."""
    model = UniconModel.from_plan(plan, through_stage=0)
    out: list[dict[str, float]] = []
    arrays_seen: list[dict[str, torch.Tensor]] = []
    for round_ in (1, 2):
        if fresh:
            site._spare_model = None
        request, arrays = request_for(plan, "foundation", round_, model)
        reply = site.train(request, arrays)
        arrays_seen.append(reply.arrays)
        load_state(model, reply.arrays)
        if fresh:
            site._spare_model = None
        request, arrays = request_for(plan, "foundation", round_, model)
        evaluated = site.evaluate(
            request.__class__(**{**request.__dict__, "split": "test"}), arrays
        )
        out.append({k: v for k, v in evaluated.metrics.items() if not k.startswith("time/")})
    out.append({k: float(v.double().sum()) for a in arrays_seen for k, v in a.items()})
    return out


def test_reusing_the_model_changes_no_update_and_no_metric(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    manifest = sites_dir / "hospital-a" / "manifest.yaml"
    reused = Site(manifest_path=manifest, state_dir=tmp_path / "reused")
    built = Site(manifest_path=manifest, state_dir=tmp_path / "built")
    with_reuse = _serve_two_rounds(reused, plan, fresh=False)
    without = _serve_two_rounds(built, plan, fresh=True)
    assert with_reuse == without
    assert reused._spare_model is not None  # kept after the last request


def test_the_model_is_reused_only_for_the_same_plan_and_stage(
    sites_dir: Path, tmp_path: Path, plan: Plan
) -> None:
    site = Site(manifest_path=sites_dir / "hospital-a" / "manifest.yaml", state_dir=tmp_path)
    model = UniconModel.from_plan(plan, through_stage=0)
    request, arrays = request_for(plan, "foundation", 1, model)
    site.train(request, arrays)
    assert site._spare_model is not None
    first = site._spare_model[1]
    request, arrays = request_for(plan, "foundation", 2, model)
    site.train(request, arrays)
    assert site._spare_model[1] is first  # the same module, reloaded
    grown = UniconModel.from_plan(plan, through_stage=1)
    request, arrays = request_for(plan, "prognosis", 1, grown)
    assert site._model_for(request, dict(arrays)) is not first  # another stage: built afresh


def test_a_request_that_fails_leaves_no_model_to_reuse(
    sites_dir: Path, tmp_path: Path, plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(manifest_path=sites_dir / "hospital-a" / "manifest.yaml", state_dir=tmp_path)
    model = UniconModel.from_plan(plan, through_stage=0)
    request, arrays = request_for(plan, "foundation", 1, model)
    site.train(request, arrays)
    assert site._spare_model is not None

    def broken(*args: object, **kwargs: object) -> None:
        raise SiteError("training broke half-way")

    monkeypatch.setattr(client.site, "train", broken)
    request, arrays = request_for(plan, "foundation", 2, model)
    with pytest.raises(SiteError, match="half-way"):
        site.train(request, arrays)
    assert site._spare_model is None  # a half-trained model is never reloaded


def test_a_stored_reply_is_written_without_fsync_and_read_back_whole_or_not_at_all(
    sites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(manifest_path=sites_dir / "hospital-a" / "manifest.yaml", state_dir=tmp_path)
    reply = client.site.SiteReply({"w": torch.arange(6.0).reshape(2, 3)}, {"loss": 0.5})
    synced: list[int] = []
    monkeypatch.setattr(client.site.os, "fsync", lambda fd: synced.append(fd))
    site._store_reply("run/stage/1/abc", reply)
    assert synced == []  # no fsync: a lost reply is only served again
    stored = site._load_stored_reply("run/stage/1/abc")
    assert stored is not None and stored.metrics == {"loss": 0.5}
    assert torch.equal(stored.arrays["w"], reply.arrays["w"])
    # what a power loss could leave: a torn tensor file is detected, never used
    tensors = site._reply_path("run/stage/1/abc", ".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:20])
    assert site._load_stored_reply("run/stage/1/abc") is None
