"""Shared fixtures: tiny synthetic hospitals and a tiny plan (fast on 2 CPU cores)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from simulations.inprocess import claim_server_identity
from simulations.synthetic import make_sites
from unicon_model.schema import Plan, validate_plan

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
claim_server_identity()  # tests build Flower messages outside a ServerApp

TINY_MODEL = {"spatial_dims": 3, "widths": [4, 8, 16], "adapter_rank": 2, "head_hidden": 8}


def tiny_plan(**overrides: Any) -> dict[str, Any]:
    """The UNICON scenario shrunk to 16³ patches and a 3-level encoder."""
    plan: dict[str, Any] = {
        "name": "tiny",
        "model": TINY_MODEL,
        "data": {"patch_size": [16, 16, 16]},
        "stages": [
            {
                "name": "foundation",
                "add_modalities": [{"name": "ct"}],
                "add_tasks": [
                    {
                        "name": "lesion-class",
                        "kind": "classification",
                        "classes": ["benign", "malignant"],
                    }
                ],
                "train": ["backbone", "modality/ct", "task/lesion-class"],
                "rounds": 2,
                "batch_size": 4,
                "optimizer": {"name": "adam", "lr": 0.01},
            },
            {
                "name": "prognosis",
                "add_tasks": [
                    {"name": "survival", "kind": "survival", "covariates": ["age", "stage"]}
                ],
                "rounds": 2,
                "batch_size": 8,
            },
            {
                "name": "segmentation",
                "add_tasks": [
                    {
                        "name": "lesion-seg",
                        "kind": "segmentation",
                        "labels": ["background", "tumour"],
                    }
                ],
                "rounds": 2,
            },
            {
                "name": "pet",
                "add_modalities": [{"name": "pet", "inputs": ["ct", "pet"], "init_from": "ct"}],
                "objectives": ["lesion-seg"],
                "rounds": 2,
            },
        ],
    }
    plan.update(overrides)
    return plan


@pytest.fixture(scope="session")
def sites_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic hospitals (two with PET) of 16³ volumes, written once per session."""
    out = tmp_path_factory.mktemp("sites")
    make_sites(out, sites=3, seed=7, size=16, cases_per_site=14, pet_sites=2)
    return out


@pytest.fixture
def plan() -> Plan:
    return validate_plan(tiny_plan())
