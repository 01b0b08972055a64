"""``site run`` progress: the site logs one line per request served."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from client.site import Site
from tests.conftest import tiny_plan
from tests.test_site import request_for
from unicon_model import protocol
from unicon_model.model import UniconModel
from unicon_model.schema import validate_plan


def test_each_request_served_logs_stage_round_cases_seconds_and_epsilon(
    sites_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["rounds"] = 1
    plan = validate_plan(raw)
    site = Site(manifest_path=sites_dir / "hospital-a" / "manifest.yaml", state_dir=tmp_path)
    request, arrays = request_for(
        plan, "foundation", 1, UniconModel.from_plan(plan, through_stage=0)
    )
    with caplog.at_level(logging.INFO, logger="client.site"):
        reply = site.train(request, arrays)
        site.evaluate(dataclasses.replace(request, split="test"), arrays)
    lines = [r.getMessage() for r in caplog.records if "served" in r.getMessage()]
    assert len(lines) == 2, lines
    cases = int(reply.metrics[protocol.KEY_NUM_EXAMPLES])
    assert re.fullmatch(
        rf"site hospital-a: served train stage foundation round 1: {cases} case\(s\), "
        r"\d+\.\d s, ε so far 0\.0",
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        r"site hospital-a: served evaluate stage foundation round 1 \(test\): \d+ case\(s\), "
        r"\d+\.\d s, ε so far 0\.0",
        lines[1],
    ), lines[1]
