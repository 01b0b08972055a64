"""Export a registry version as a self-contained inference package.

Layout of the package::

    model/manifest.json, model/*.safetensors   the verified checkpoint (weights + lineage)
    predict.py                                 launcher of ``unicon predict --model model``
    README.md                                  tasks, modalities, lineage and usage

The checkpoint is verified (sha256 of every file) before and after copying, and the package
is written to a temporary sibling folder and renamed, so a failed export leaves nothing
half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from server.errors import RegistryError
from server.registry import Registry
from unicon_model.checkpoint import MANIFEST_NAME, CheckpointManifest, verify_checkpoint

LAUNCHER = '''\
"""Predict with this exported UNICON model (runs `unicon predict --model model`).

    python predict.py --image ct=scan.nii.gz [--image pet=pet.nii.gz] [--task NAME]
                      [--clinical age=64 --clinical stage=2] [--mask-out out/seg.nii.gz]

Prints one JSON object. Needs the UNICON repository installed (see README.md).
"""

import sys
from pathlib import Path

from client.predict import main

if __name__ == "__main__":
    main(["--model", str(Path(__file__).resolve().parent / "model"), *sys.argv[1:]])
'''
"""The package's ``predict.py``: a launcher of :func:`client.predict.main` (``unicon
predict``) with ``--model`` set to the package's ``model/`` folder."""


def _readme(manifest: CheckpointManifest) -> str:
    config = manifest.model_config_
    tasks = "\n".join(
        f"- `{t['name']}` ({t['kind']}"
        + (
            f": {', '.join(t.get('classes') or t.get('labels') or [])}"
            if t["kind"] != "survival"
            else ""
        )
        + (f"; covariates {', '.join(t['covariates'])}" if t.get("covariates") else "")
        + ")"
        for t in config.get("tasks", [])
    )
    modalities = "\n".join(
        f"- `{m['name']}`: images {', '.join(m.get('inputs') or [m['name']])}"
        for m in config.get("modalities", [])
    )
    lineage = manifest.lineage
    return f"""# UNICON model {manifest.version}

Plan `{lineage.plan}`, stage `{lineage.stage}` (parent `{lineage.parent}`), {lineage.rounds}
round(s) over sites {", ".join(lineage.sites) or "-"}; created {lineage.created_at}.
Privacy spent per site (ε): {json.dumps(lineage.epsilon)}.
Pooled test metrics: {json.dumps(lineage.metrics)}.

## Tasks
{tasks}

## Modalities
{modalities}

Images are preprocessed as in training: patch {config.get("data", {}).get("patch_size")},
spacing {config.get("data", {}).get("spacing")}.

## Usage
Install the UNICON repository that trained this model: in a checkout of it,
`pip install -e .` (this provides the `unicon` command). Then, from this folder:

    unicon predict --model model --image ct=scan.nii.gz --clinical age=64 --clinical stage=2
    python predict.py --image ct=scan.nii.gz --clinical age=64 --clinical stage=2  # the same

`unicon predict --help` lists the options (`--task`, `--modality`, `--mask-out`); the output
is one JSON object per case.

`model/` holds the weights (safetensors) and `manifest.json` with every file's sha256; the
predictor refuses files whose hash does not match.
"""


def export_version(registry: Registry, version: str, out: str | Path) -> Path:
    """Write the inference package of ``version`` to ``out`` (which must not exist).

    Raises
    ------
    RegistryError
        If the version id is malformed, the version is unknown, damaged or fails
        verification, or ``out`` exists.
    """
    out = Path(out)
    if out.exists():
        raise RegistryError(f"{out} already exists; choose a new folder for the export")
    manifest = registry.manifest(version)  # checks the id, names a damaged manifest
    source = registry.version_dir(version)
    problems = verify_checkpoint(source)
    if problems:
        raise RegistryError(f"version {version} fails verification: {'; '.join(problems)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model_dir = staging / "model"
        model_dir.mkdir()
        for name in [MANIFEST_NAME, *(c.file for c in manifest.components.values())]:
            shutil.copy2(source / name, model_dir / name)
        copied = verify_checkpoint(model_dir)
        if copied:
            raise RegistryError(f"copy of {version} is corrupt: {'; '.join(copied)}")
        (staging / "predict.py").write_text(LAUNCHER)
        (staging / "README.md").write_text(_readme(manifest))
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
