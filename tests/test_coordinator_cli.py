"""Coordinator and site CLIs over a real registry: status, model ls/show/export, predict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from client.inference import Predictor
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_cli.main import full_app
from unicon_model.schema import validate_plan

runner = CliRunner()
SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables at full width, as on a wide terminal (no wrapped or truncated cells)."""
    import client.cli
    import server.cli
    import server.registry_cli

    for module in (client.cli, server.cli, server.registry_cli):
        monkeypatch.setattr(module.console, "width", 200)


@pytest.fixture(scope="module")
def registry(sites_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry after two one-round stages (classification, then survival)."""
    root = tmp_path_factory.mktemp("cli")
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:2]
    for stage in raw["stages"]:
        stage["rounds"] = 1
    transport = InProcessTransport([sites_dir / s for s in SITES], root / "state")
    Coordinator(validate_plan(raw), Registry(root / "registry"), transport, site_wait=0).run()
    return root / "registry"


def test_status_and_model_ls_show_the_lineage(registry: Path) -> None:
    app = full_app()
    status = runner.invoke(app, ["status", "--registry", str(registry)])
    assert status.exit_code == 0, status.output
    assert "foundation" in status.output and "v0002-prognosis" in status.output
    listing = runner.invoke(app, ["model", "ls", "--registry", str(registry)])
    assert listing.exit_code == 0, listing.output
    assert "v0001-foundation" in listing.output and "v0002-prognosis" in listing.output
    shown_text = runner.invoke(
        app, ["model", "show", "v0002-prognosis", "--registry", str(registry)]
    ).output
    assert all(site in shown_text for site in SITES)  # the sites are listed by `show`
    shown = runner.invoke(
        app, ["model", "show", "v0002-prognosis", "--json", "--registry", str(registry)]
    )
    assert shown.exit_code == 0, shown.output
    manifest = json.loads(shown.output)
    assert manifest["lineage"]["parent"] == "v0001-foundation"
    assert manifest["lineage"]["sites"] == SITES
    assert manifest["model_config"]["data"]["patch_size"] == [16, 16, 16]
    missing = runner.invoke(app, ["model", "show", "v0009", "--registry", str(registry)])
    assert missing.exit_code == 1 and "v0001-foundation" in missing.output


def test_listings_of_a_real_registry_fit_80_columns(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.cli
    import server.registry_cli

    monkeypatch.setenv("COLUMNS", "80")
    for module in (server.cli, server.registry_cli):
        monkeypatch.setattr(module.console, "width", 80)
    app = full_app()
    for args in (
        ["model", "ls"],
        ["status"],
        ["model", "show", "v0002-prognosis"],
        ["status", "--stage", "prognosis"],
    ):
        result = runner.invoke(app, [*args, "--registry", str(registry)])
        assert result.exit_code == 0, result.output
        assert "…" not in result.stdout, result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
        # every row names its version or stage in full (status drops the version column
        # at 80 columns, before it would cut a name)
        assert "v0002-prognosis" in result.stdout or "prognosis" in result.stdout.split()
    listed = json.loads(
        runner.invoke(app, ["model", "ls", "--json", "--registry", str(registry)]).stdout
    )
    assert [v["site_count"] for v in listed["versions"]] == [3, 3]
    assert listed["versions"][1]["metric"] == "survival@ct"  # the prognosis stage's own task
    status = json.loads(
        runner.invoke(app, ["status", "--json", "--registry", str(registry)]).stdout
    )
    assert [s["state"] for s in status["tiny"]["stages"]] == ["done", "done"]


def test_export_package_predicts_like_the_registry_model(
    registry: Path, sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare / Execute: export, then run the package's predict.py on a site's case
    app = full_app()
    out = tmp_path / "package"
    result = runner.invoke(
        app, ["model", "export", "v0002-prognosis", str(out), "--registry", str(registry)]
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model", "predict.py", "README.md"}
    manifest = yaml.safe_load((sites_dir / "hospital-a" / "manifest.yaml").read_text())
    case = manifest["cases"][0]
    image = sites_dir / "hospital-a" / case["images"]["ct"]
    clinical = case["clinical"]
    completed = subprocess.run(
        [
            sys.executable,
            str(out / "predict.py"),
            "--image",
            f"ct={image}",
            "--clinical",
            f"age={clinical['age']}",
            "--clinical",
            f"stage={clinical['stage']}",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parents[1],
    )
    assert completed.returncode == 0, completed.stderr
    predicted = json.loads(completed.stdout)
    # Assert: the same numbers as the registry's model on the same preprocessed case
    reference = Predictor(registry / "versions" / "v0002-prognosis").predict(
        {"ct": image}, clinical=clinical
    )
    assert predicted == reference
    probabilities = predicted["lesion-class"]["probabilities"]
    assert set(probabilities) == {"benign", "malignant"}
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert isinstance(predicted["survival"]["risk"], float)
    # exporting twice into the same folder is refused, nothing is overwritten
    again = runner.invoke(
        app, ["model", "export", "v0002-prognosis", str(out), "--registry", str(registry)]
    )
    assert again.exit_code == 1 and "already exists" in again.output


def test_a_tampered_version_is_not_exported(registry: Path, tmp_path: Path) -> None:
    copy = tmp_path / "registry"
    subprocess.run(["cp", "-r", str(registry), str(copy)], check=True)
    target = copy / "versions" / "v0001-foundation" / "task--lesion-class.safetensors"
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01
    target.write_bytes(bytes(data))
    result = runner.invoke(
        full_app(),
        ["model", "export", "v0001-foundation", str(tmp_path / "pkg"), "--registry", str(copy)],
    )
    assert result.exit_code == 1 and "sha256" in result.output
    assert not (tmp_path / "pkg").exists()


def test_predictor_segments_and_writes_the_mask(registry: Path, tmp_path: Path) -> None:
    predictor = Predictor(registry / "versions" / "v0002-prognosis")
    volume = torch.zeros(16, 16, 16).numpy()
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(Exception, match="needs clinical covariates"):
        predictor.predict({"ct": tmp_path / "ct.nii.gz"}, tasks=["survival"])
    with pytest.raises(Exception, match="match no modality"):
        predictor.predict({"mr": tmp_path / "ct.nii.gz"})


def test_site_audit_and_run_commands(sites_dir: Path, registry: Path, tmp_path: Path) -> None:
    app = full_app()
    state = registry.parent / "state" / "hospital-a"
    audit = runner.invoke(app, ["site", "audit", "--state-dir", str(state)])
    assert audit.exit_code == 0, audit.output
    assert "chain intact" in audit.output and "prognosis" in audit.output
    # tamper with a copy: the audit fails and names the line
    copy = tmp_path / "state"
    copy.mkdir()
    shutil.copytree(state / "keys", copy / "keys")  # the log is signed with the site's key
    shutil.copy2(state / "audit.anchor", copy / "audit.anchor")
    lines = (state / "audit.jsonl").read_text().splitlines()
    entry = json.loads(lines[1])
    entry["record"]["examples"] = 10**6  # claim more work than was done
    lines[1] = json.dumps(entry)
    (copy / "audit.jsonl").write_text("\n".join(lines) + "\n")
    broken = runner.invoke(app, ["site", "audit", "--state-dir", str(copy)])
    assert broken.exit_code == 1 and "line 2" in broken.output
    # the daemon command line: node config with absolute paths, TLS when a CA is given
    dry = runner.invoke(
        app,
        [
            "site",
            "run",
            "--superlink",
            "coordinator.example.org:9093",
            "--manifest",
            str(sites_dir / "hospital-a" / "manifest.yaml"),
            "--state-dir",
            str(tmp_path / "site-state"),
            "--root-certificates",
            str(tmp_path / "ca.crt"),
            "--auth-key",
            str(tmp_path / "key"),
            "--dry-run",
        ],
    )
    assert dry.exit_code == 0, dry.output
    text = " ".join(dry.output.split())
    assert "flower-supernode" in text and "--root-certificates" in text
    assert f'manifest="{(sites_dir / "hospital-a" / "manifest.yaml").resolve()}"' in text
    assert "--insecure" not in text


def test_server_start_needs_certificates_or_explicit_insecure(tmp_path: Path) -> None:
    app = full_app()
    refused = runner.invoke(app, ["server", "start", "--state", str(tmp_path)])
    assert refused.exit_code == 2 and "--certs" in refused.output
    dry = runner.invoke(
        app,
        ["server", "start", "--state", str(tmp_path), "--insecure", "--port", "9999", "--dry-run"],
    )
    assert dry.exit_code == 0 and "--insecure" in dry.output and "9999" in dry.output
    missing = runner.invoke(
        app, ["server", "start", "--state", str(tmp_path), "--certs", str(tmp_path), "--dry-run"]
    )
    assert missing.exit_code == 1 and "unicon certs init" in missing.output


def test_add_site_refuses_missing_and_non_ecdsa_keys(tmp_path: Path) -> None:
    app = full_app()
    missing = runner.invoke(app, ["server", "add-site", str(tmp_path / "none.pub")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    key = tmp_path / "site.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB site\n")
    wrong = runner.invoke(app, ["server", "add-site", str(key)])
    assert wrong.exit_code == 1 and "not an OpenSSH ECDSA public key" in wrong.output
