"""Manifests are untrusted files: alias bombs, deep nesting, huge files, unsafe site names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import client.manifest as manifest_module
from client.errors import ManifestError
from client.manifest import SiteManifest, load_manifest, parse_manifest, validate_manifest
from client.manifest_check import check_manifest
from unicon_model.names import NAME_RULE

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
site: hospital-a
tasks: {}
cases: *i
"""

VALID = {
    "site": "hospital-a",
    "tasks": {"survival": {"kind": "survival"}},
    "cases": [{"id": "c1", "images": {"ct": "c1.nii.gz"}, "labels": {}}],
}


def _only_problem(path: Path) -> str:
    manifest, problems = validate_manifest(path)
    assert manifest is None
    assert len(problems) == 1, [str(p) for p in problems]
    return str(problems[0])


def test_yaml_alias_bomb_is_refused_quickly_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "manifest.yaml"
    path.write_text(BILLION_LAUGHS)
    # Execute
    started = time.perf_counter()
    message = _only_problem(path)
    elapsed = time.perf_counter() - started
    # Assert
    assert str(path) in message
    assert "line 2" in message and "alias *a" in message
    assert "aliases are not allowed" in message
    assert elapsed < 5.0  # (unchecked, it grew to gigabytes)
    with pytest.raises(ManifestError, match="aliases are not allowed"):
        load_manifest(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("manifest.yaml", "site: " + "[" * 50_000 + "]" * 50_000),
        ("manifest.yaml", "site:\n" + "- " * 50_000 + "x\n"),
        ("manifest.json", '{"site": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        ("manifest.json", '{"site": ' + "[" * 200 + "]" * 200 + "}"),
    ],
    ids=["yaml-flow-50k", "yaml-block-50k", "json-50k", "json-200"],
)
def test_deeply_nested_manifest_is_a_clear_error(tmp_path: Path, name: str, text: str) -> None:
    # Prepare
    path = tmp_path / name
    path.write_text(text)
    # Execute
    started = time.perf_counter()
    message = _only_problem(path)
    # Assert: no RecursionError, a message naming the file and the limit
    assert str(path) in message
    assert f"nested more than {manifest_module.MAX_MANIFEST_DEPTH} levels" in message
    assert time.perf_counter() - started < 5.0  # (the unchecked parse recursed or hung)
    report = check_manifest(path)
    assert [p.message for p in report.errors] == [message]


def test_oversized_manifest_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a limit of 1 KiB and a 2 KiB manifest
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1024)
    path = tmp_path / "manifest.yaml"
    path.write_text("site: hospital-a\n" + "#" * 2048 + "\n")
    # Execute
    message = _only_problem(path)
    # Assert
    assert str(path) in message and "larger than" in message


@pytest.mark.parametrize(
    "site",
    [
        "site\u200b-a",  # zero-width space
        "site\u202e-a",  # right-to-left override
        "\u2066site-a",  # left-to-right isolate
        "Hospital-A",
        "site a",
        "site.a",
        "../site-a",
        "-site",
        "a" * 65,
        "h\u00f4pital",
    ],
)
def test_site_names_outside_the_name_rule_are_refused(tmp_path: Path, site: str) -> None:
    # Prepare
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**VALID, "site": site}))
    # Execute
    parsed = parse_manifest(path)
    # Assert: one problem, on field site, showing the escaped name and the rule
    assert parsed.manifest is None
    assert [p.field for p in parsed.problems] == ["site"]
    message = parsed.problems[0].message
    assert repr(site)[:40] in message
    assert NAME_RULE in message
    # the rest of the manifest is still parsed, so its files can be checked in the same run
    assert parsed.parsed is not None and [c.id for c in parsed.parsed.cases] == ["c1"]
    assert parsed.complete
    with pytest.raises(ValidationError, match="is not a valid name"):
        SiteManifest(site=site, tasks={}, cases=[])


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_yaml_and_json_manifests_load_alike(tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = tmp_path / f"manifest{suffix}"
    text = json.dumps(VALID) if suffix == ".json" else yaml.safe_dump(VALID)
    path.write_text(text)
    # Execute
    manifest = load_manifest(path)
    # Assert
    assert manifest.site == "hospital-a"
    assert [c.id for c in manifest.cases] == ["c1"]
    assert manifest.root == tmp_path


def test_datalist_name_with_bidi_characters_is_refused(tmp_path: Path) -> None:
    # Prepare: a Decathlon datalist whose name hides a right-to-left override
    path = tmp_path / "dataset.json"
    datalist = {"name": "Heart\u202e", "training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}
    path.write_text(json.dumps(datalist))
    # Execute
    manifest, problems = validate_manifest(path)
    # Assert: reported once, on the datalist's name
    assert manifest is None
    assert [p.field for p in problems] == ["name"]
    assert "'Heart\\u202e'" in problems[0].message and NAME_RULE in problems[0].message


def test_manifests_we_write_hold_no_aliases_even_for_shared_objects(tmp_path: Path) -> None:
    # Arrange: one labels dict shared by two cases (yaml.safe_dump would write &id001/*id001)
    labels = {"survival": {"time": 3.0, "event": 1}}
    data = {
        "site": "hospital-a",
        "tasks": {"survival": {"kind": "survival"}},
        "cases": [
            {"id": f"c{i}", "images": {"ct": f"c{i}.nii.gz"}, "labels": labels} for i in (1, 2)
        ],
    }
    assert "*id001" in yaml.safe_dump(data)
    # Act
    text = manifest_module.manifest_yaml(data)
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    # Assert: no anchor or alias, and the site's own loader reads it back unchanged
    assert "&" not in text and "*" not in text
    assert yaml.safe_load(text) == data
    assert [c.id for c in load_manifest(path).cases] == ["c1", "c2"]
