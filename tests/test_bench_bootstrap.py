"""The bootstrap-overhead benchmark's parts: the requests of a run, the timed extras."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import client.trainer as trainer
from simulations.bench import _extras_patched, evaluation_requests


def test_evaluation_requests_lists_every_site_request_of_a_run(tmp_path: Path) -> None:
    records = [
        {"kind": "round", "stage": "s1", "round": 1, "val": {"per_site": {"a": {"x@ct": 0.5}}}},
        {"kind": "round", "stage": "s1", "round": 2},  # not validated: no request
        {"kind": "stage_timing", "stage": "s1"},
        {
            "kind": "evaluation",
            "stage": "s1",
            "per_site": {"a": {"x@ct": 0.5, "y@ct": 0.6}, "b": {"x@ct": 0.4}},
            "unseen": {"per_site": {"h": {"x@ct": 0.3}}},
        },
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluation_requests(metrics) == [["x@ct"], ["x@ct", "y@ct"], ["x@ct"], ["x@ct"]]


def test_extras_are_timed_per_route_or_disabled_and_restored_after() -> None:
    real = trainer.classification_extras
    truth, probs = (
        np.array([0, 1, 1, 0]),
        np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]]),
    )
    store: dict[str, float] = {}
    with _extras_patched(store, enabled=True):
        timed = trainer.classification_extras("c@ct", truth, probs)
    assert timed == real("c@ct", truth, probs)  # the same figures, timed
    assert set(store) == {"c@ct"} and store["c@ct"] > 0
    with _extras_patched(store, enabled=False):
        assert trainer.classification_extras("c@ct", truth, probs) == {}
        assert trainer.survival_extras("s@ct", [1.0], [0.1], [1]) == {}
    assert trainer.classification_extras is real
