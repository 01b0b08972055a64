"""Site folders: state keyed by the manifest's site name, one folder per site, JSON manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from client.client_app import site_paths
from client.errors import SiteError
from client.manifest import manifest_yaml
from client.site_folder import check_unique_sites, find_manifest, manifest_in, site_state_dir
from simulations.cli import QUICK
from simulations.inprocess import InProcessTransport
from simulations.synthetic import make_sites
from unicon_cli.main import full_app
from unicon_model.names import UnsafeNameError

runner = CliRunner()


def _flat(output: str) -> str:
    """CLI output with rich's box borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def one_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny generated hospital folder (8³ volumes)."""
    out = tmp_path_factory.mktemp("one-site")
    make_sites(out, sites=1, seed=3, size=8, cases_per_site=6, pet_sites=0)
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def _copy(folder: Path, to: Path, *, site: str | None = None, as_json: bool = False) -> Path:
    """A copy of a site folder, optionally declaring another site name or as manifest.json."""
    shutil.copytree(folder, to)
    manifest = yaml.safe_load((to / "manifest.yaml").read_text())
    if site is not None:
        manifest["site"] = site
    if as_json:
        (to / "manifest.yaml").unlink()
        (to / "manifest.json").write_text(json.dumps(manifest))
    else:
        (to / "manifest.yaml").write_text(manifest_yaml(manifest))
    return to


def test_two_hospitals_whose_folders_share_a_name_get_their_own_state(
    one_site: Path, tmp_path: Path
) -> None:
    # Arrange: two folders both called site-0 (different parents), declaring two sites
    a = _copy(one_site, tmp_path / "hospital-a" / "site-0", site="hospital-a")
    b = _copy(one_site, tmp_path / "hospital-b" / "site-0", site="hospital-b")
    # Act
    transport = InProcessTransport([a, b], tmp_path / "state")
    # Assert: one state dir per site name, none per folder name
    dirs = [Path(str(c.node_config["state-dir"])) for c in transport.contexts.values()]
    assert dirs == [
        (tmp_path / "state" / "hospital-a").resolve(),
        (tmp_path / "state" / "hospital-b").resolve(),
    ]


def test_two_folders_declaring_one_site_are_refused_naming_both(
    one_site: Path, tmp_path: Path
) -> None:
    a = _copy(one_site, tmp_path / "x" / "site-0", site="same")
    b = _copy(one_site, tmp_path / "y" / "other", site="same")
    with pytest.raises(SiteError) as e:
        check_unique_sites([a, b])
    assert "'same'" in str(e.value) and str(a) in str(e.value) and str(b) in str(e.value)
    with pytest.raises(SiteError):
        InProcessTransport([a, b], tmp_path / "state")
    # the CLI says so before any work starts (exit 2, both folders named)
    result = runner.invoke(
        full_app(),
        ["simulate", "--sites", str(a), "--sites", str(b), "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 2
    assert "same site name" in _flat(result.output)
    assert not (tmp_path / "r" / "work" / "state").exists()


def test_a_folder_with_manifest_json_is_a_site_folder(one_site: Path, tmp_path: Path) -> None:
    folder = _copy(one_site, tmp_path / "json-site", as_json=True)
    assert find_manifest(folder) == folder / "manifest.json"
    transport = InProcessTransport([folder], tmp_path / "state")
    assert Path(str(transport.contexts[1].node_config["manifest"])) == folder / "manifest.json"
    (folder / "manifest.yaml").write_text("site: x\n")
    with pytest.raises(SiteError, match="holds 2 manifests"):
        manifest_in(folder)


def test_the_simulation_engines_site_paths_key_state_by_site_name(
    one_site: Path, tmp_path: Path
) -> None:
    folder = _copy(one_site, tmp_path / "site-0", site="hospital-z")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config={"site-dirs": json.dumps([str(folder)]), "state-root": str(tmp_path / "s")},
    )
    manifest, state, policy = site_paths(context)
    assert manifest == folder / "manifest.yaml"
    assert state == (tmp_path / "s" / "hospital-z").resolve()
    assert policy is None


def test_a_state_dir_never_leaves_its_root(tmp_path: Path) -> None:
    for bad in ("../x", "/etc", "a/b", "..", ""):
        with pytest.raises(UnsafeNameError):
            site_state_dir(tmp_path, bad)


def test_sites_given_as_two_words_get_a_usage_hint(tmp_path: Path) -> None:
    result = runner.invoke(full_app(), ["simulate", "--sites", str(tmp_path), "other-folder"])
    assert result.exit_code == 2
    assert "--sites A --sites B" in _flat(result.output)
    assert "No such command" not in result.output


def test_help_states_the_quick_rounds_the_code_uses() -> None:
    result = runner.invoke(full_app(), ["simulate", "--help"], terminal_width=200)
    assert f"{QUICK['rounds']} rounds per stage" in _flat(result.output)
