"""Hash of the prognosis stage's parameters after local training at a fixed seed (issue 15).

Run at two commits to show that a restructuring did not move training: same site, same
seed, the same sha256 means the same parameters. From the repository root:

    .venv/bin/unicon simulate make-data --out /tmp/sc/sites --sites 2 --size 16 --cases 20 \\
        --pet-sites 1
    .venv/bin/python docs/measured/trainer_identity.py /tmp/sc/sites/hospital-a

Measured 2026-12-02: ``31ecda9adf61973f`` (loss 0.6012827605) at aa17411, 001d808 and b6a2dba.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.data import build_dataset
from client.manifest import load_manifest
from client.trainer import train
from unicon_model.model import UniconModel
from unicon_model.schema import validate_plan

try:
    from simulations.simulate_setup import plan_for_run
except ImportError:  # before the issue 15 restructuring
    from simulations.cli import plan_for_run  # type: ignore[attr-defined,no-redef]


def main() -> None:
    """Train the quick plan's prognosis stage on one site with seed 0; print loss and hash."""
    site = Path(sys.argv[1])
    raw = plan_for_run(
        Path("examples/plans/unicon_retrain.toml"), quick=True, dp=None, secure_sites=3
    )
    plan = validate_plan(raw)
    index = [s.name for s in plan.stages].index("prognosis")
    model = UniconModel.from_plan(plan, through_stage=index)
    stage = plan.stages[index]
    task = stage.add_tasks[0]
    dataset = build_dataset(
        load_manifest(site / "manifest.yaml"), split="train",
        modality=model.modality_specs["ct"], tasks={task.name: task}, data=plan.data,
    )  # fmt: skip
    result = train(model, stage, dataset, tasks={task.name: task}, seed=0)
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    ).hexdigest()
    print(json.dumps({"loss": result.metrics, "sha256": digest}))


if __name__ == "__main__":
    main()
