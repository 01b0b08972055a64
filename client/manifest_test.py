"""Tests of the site manifest: loading YAML/JSON/datalists, counts, every problem at once."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import yaml

from client.errors import ManifestError
from client.manifest import (
    Case,
    SiteManifest,
    SurvivalLabel,
    TaskDeclaration,
    load_manifest,
    validate_manifest,
)

VALID = """
site: hospital-a
tasks:
  lesion-class: {kind: classification, classes: [benign, malignant]}
  survival:     {kind: survival}
  lesion-seg:   {kind: segmentation, labels: [background, tumour]}
cases:
  - id: case-001
    split: train
    images: {ct: ct/case-001.nii.gz, pet: pet/case-001.nii.gz}
    clinical: {age: 64, stage: 2}
    labels: {lesion-class: malignant, survival: {time: 523.0, event: 1},
             lesion-seg: seg/case-001.nii.gz}
  - id: case-002
    split: train
    images: {ct: ct/case-002.nii.gz}
    labels: {lesion-class: benign, survival: {time: 100, event: 0}}
  - id: case-003
    images: {ct: ct/case-003.nii.gz}
    labels: {lesion-class: malignant}
  - id: case-004
    split: val
    images: {ct: ct/case-004.nii.gz, pet: pet/case-004.nii.gz}
    labels: {survival: {time: 12.5, event: true}, lesion-seg: seg/case-004.nii.gz}
  - id: case-005
    split: test
    images: {pet: /data/elsewhere/pet-005.nii.gz}
    labels: {lesion-class: benign}
"""

EXPECTED_COUNTS = {
    "cases": {"train": 3, "val": 1, "test": 1},
    "tasks": {
        "lesion-class": {"train": 3, "val": 0, "test": 1},
        "survival": {"train": 2, "val": 1, "test": 0},
        "lesion-seg": {"train": 1, "val": 1, "test": 0},
    },
    "modalities": {
        "ct": {"train": 3, "val": 1, "test": 0},
        "pet": {"train": 1, "val": 1, "test": 1},
    },
    "classes": {"lesion-class": {"benign": 1, "malignant": 2}},
    "unlabelled": {"train": 0, "val": 0, "test": 0},
}

BROKEN = """
site: hospital-x
tasks:
  lesion-class: {kind: classification, classes: [benign, malignant]}
  survival: {kind: survival}
  lesion-seg: {kind: segmentation, labels: [background, tumour]}
  grade: {kind: clasification, classes: [low, high]}
  stage-class: {kind: classification, classes: [only-one]}
cases:
  - {id: case-001, images: {ct: ct/1.nii.gz}}
  - {id: case-001, images: {ct: ct/2.nii.gz}}
  - {id: case-003, split: validation, images: {ct: ct/3.nii.gz}}
  - {id: case-004, images: {ct: ct/4.nii.gz}, labels: {grading: high}}
  - {id: case-005, images: {ct: ct/5.nii.gz}, labels: {lesion-class: malignnt}}
  - {id: case-006, images: {ct: ct/6.nii.gz}, labels: {survival: {time: -1, event: 2}}}
  - {id: case-007, images: {ct: ct/7.nii.gz}, labels: {lesion-seg: 3}}
  - {id: case-008, images: {}}
  - {id: case-009, split: train}
  - {id: case-010, images: {ct: ct/10.nii.gz}, labels: {grade: high}}
  - {id: case-011, images: {ct: ct/11.nii.gz}, lables: {}}
"""


def test_yaml_manifest_loads_with_hand_computed_counts(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "manifest.yaml"
    path.write_text(VALID)
    # Execute
    manifest = load_manifest(path)
    # Assert: structure
    assert manifest.site == "hospital-a"
    assert manifest.root == tmp_path
    assert list(manifest.tasks) == ["lesion-class", "survival", "lesion-seg"]
    assert manifest.tasks["lesion-class"].classes == ["benign", "malignant"]
    assert manifest.tasks["lesion-seg"].labels == ["background", "tumour"]
    assert [c.id for c in manifest.cases] == [f"case-00{i}" for i in range(1, 6)]
    assert manifest.cases[2].split == "train"  # the default split
    assert manifest.modalities == ["ct", "pet"]
    # Assert: labels and clinical covariates are typed
    first = manifest.cases[0]
    assert first.clinical == {"age": 64.0, "stage": 2.0}
    survival = first.labels["survival"]
    assert isinstance(survival, SurvivalLabel)
    assert (survival.time, survival.event) == (523.0, 1)
    assert manifest.cases[3].labels["survival"] == SurvivalLabel(time=12.5, event=1)
    assert str(first.labels["lesion-seg"]) == "seg/case-001.nii.gz"
    # Assert: counts, paths and filters
    assert manifest.counts() == EXPECTED_COUNTS
    assert manifest.resolve("ct/case-001.nii.gz") == tmp_path / "ct" / "case-001.nii.gz"
    assert manifest.resolve("/data/elsewhere/pet-005.nii.gz") == Path(
        "/data/elsewhere/pet-005.nii.gz"
    )
    assert [c.id for c in manifest.cases_with(task="survival", split="train")] == [
        "case-001",
        "case-002",
    ]
    assert [c.id for c in manifest.cases_with(modality="pet")] == [
        "case-001",
        "case-004",
        "case-005",
    ]
    assert [c.id for c in manifest.cases_with("lesion-seg", "pet", "val")] == ["case-004"]
    assert manifest.cases_with() == manifest.cases
    assert "root" not in manifest.model_dump()


def test_json_manifest_loads_like_yaml(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site" / "manifest.json"
    path.parent.mkdir()
    path.write_text(json.dumps(yaml.safe_load(VALID)))
    # Execute
    manifest = load_manifest(str(path))
    # Assert
    assert manifest.counts() == EXPECTED_COUNTS
    assert manifest.root == path.parent
    assert manifest.modalities == ["ct", "pet"]


def test_every_problem_is_reported_in_one_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "manifest.yaml"
    path.write_text(BROKEN)
    # Execute
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    # Assert: one error naming the file, every problem with its case and field
    error = caught.value
    assert error.source == str(path)
    expected = [
        "case 'case-001' (cases[1]).id: duplicate case id (cases[0] has the same id)",
        "case 'case-003' (cases[2]).split: unknown split 'validation'",
        "case 'case-004' (cases[3]).labels.grading: task 'grading' is not declared under tasks",
        "case 'case-005' (cases[4]).labels.lesion-class: 'malignnt' is not one of the declared "
        "classes ['benign', 'malignant'] (did you mean 'malignant'?)",
        "case 'case-006' (cases[5]).labels.survival.time: time must be a finite number > 0",
        "case 'case-006' (cases[5]).labels.survival.event: event must be 0 (censored) or 1",
        "case 'case-007' (cases[6]).labels.lesion-seg: a segmentation label must be the path "
        "of a mask file",
        "case 'case-008' (cases[7]).images: the case has no images",
        "case 'case-009' (cases[8]).images: is required",
        "tasks.grade.kind: unknown value 'clasification'",
        "tasks.stage-class.classes: needs at least 2 classes",
        "case 'case-011' (cases[10]).lables: unknown field",
    ]
    for text in expected:
        assert any(text in problem for problem in error.problems), (text, error.problems)
    # a label of a declared but invalid task is reported once, under tasks
    assert not any("case-010" in problem for problem in error.problems)
    assert len(error.problems) == len(expected)
    assert str(path) in str(error)


def test_problems_of_the_top_level_are_listed_together(tmp_path: Path) -> None:
    # Prepare: no site, tasks is a list, an unknown key, cases not a list
    path = tmp_path / "manifest.yaml"
    path.write_text("tasks: [survival]\ncases: {id: a}\nsight: hospital\n")
    # Execute
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    # Assert
    problems = caught.value.problems
    assert any(p.startswith("site: is required") for p in problems)
    assert any(p.startswith("tasks: must be a mapping") for p in problems)
    assert any(p.startswith("cases: must be a list") for p in problems)
    assert any(p.startswith("sight: unknown field") for p in problems)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "broken-site.yaml"
    path.write_text("site: a\ntasks: {survival: [\ncases:\n  - id: x\n")
    # Execute
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    # Assert
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert "broken-site.yaml is not valid YAML" in problem
    assert "line" in problem
    assert "broken-site.yaml" in str(caught.value)


def test_json_syntax_error_names_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site.json"
    path.write_text('{"site": "a",, }')
    # Execute / Assert
    with pytest.raises(ManifestError, match=r"site\.json is not valid JSON \(line 1"):
        load_manifest(path)


def test_missing_file_and_unknown_format_name_the_path(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ManifestError, match=r"absent\.yaml does not exist"):
        load_manifest(tmp_path / "absent.yaml")
    other = tmp_path / "manifest.toml"
    other.write_text("site = 'a'")
    with pytest.raises(ManifestError, match=r"unknown manifest format '\.toml'"):
        load_manifest(other)


def test_decathlon_datalist_maps_to_a_segmentation_manifest(tmp_path: Path) -> None:
    # Prepare: a Medical Segmentation Decathlon dataset.json
    datalist = {
        "name": "Task02_Heart",
        "modality": {"0": "MRI"},
        "labels": {"1": "left atrium", "0": "background"},
        "training": [
            {"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"},
            {"image": "./imagesTr/la_004.nii.gz", "label": "./labelsTr/la_004.nii.gz"},
        ],
        "validation": [{"image": "./imagesTr/la_005.nii.gz", "label": "./labelsTr/la_005.nii.gz"}],
        "test": ["./imagesTs/la_001.nii.gz"],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(datalist))
    # Execute
    manifest = load_manifest(path)
    # Assert
    assert manifest.site == "task02_heart"  # the name rule's case; it keys the state dir
    assert manifest.tasks == {
        "segmentation": TaskDeclaration(kind="segmentation", labels=["background", "left atrium"])
    }
    assert manifest.modalities == ["mri"]
    assert [(c.id, c.split) for c in manifest.cases] == [
        ("la_003", "train"),
        ("la_004", "train"),
        ("la_005", "val"),
        ("la_001", "test"),
    ]
    assert manifest.cases[0].images == {"mri": "./imagesTr/la_003.nii.gz"}
    assert manifest.cases[2].labels == {"segmentation": "./labelsTr/la_005.nii.gz"}
    assert manifest.cases[3].labels == {}
    assert manifest.resolve(manifest.cases[0].images["mri"]) == tmp_path / "imagesTr/la_003.nii.gz"
    assert manifest.counts()["tasks"]["segmentation"] == {"train": 2, "val": 1, "test": 0}


def test_monai_datalist_without_name_or_modality_uses_the_file_stem(tmp_path: Path) -> None:
    # Prepare: a plain MONAI datalist, several images per case, no labels mapping
    datalist = {
        "training": [
            {"image": ["a/t1.nii.gz", "a/t2.nii.gz"], "label": "a/seg.nii.gz"},
        ],
    }
    path = tmp_path / "brain-site.json"
    path.write_text(json.dumps(datalist))
    # Execute
    manifest = load_manifest(path)
    # Assert
    assert manifest.site == "brain-site"
    assert manifest.cases[0].id == "t1"
    assert manifest.cases[0].images == {"image0": "a/t1.nii.gz", "image1": "a/t2.nii.gz"}
    assert manifest.tasks["segmentation"].labels == ["background", "foreground"]


def test_datalist_problems_are_collected(tmp_path: Path) -> None:
    # Prepare: a bad labels mapping, an item without image, duplicate stems
    datalist = {
        "labels": {"zero": "background"},
        "training": [{"label": "x.nii.gz"}, {"image": "a/case.nii.gz"}],
        "validation": [{"image": "b/case.nii.gz"}],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(datalist))
    # Execute
    manifest, problems = validate_manifest(path)
    # Assert
    assert manifest is None
    texts = [str(p) for p in problems]
    assert any(t.startswith("labels: keys must be integers") for t in texts)
    assert any(t.startswith("training[0]: must be") for t in texts)


def test_models_validate_on_their_own() -> None:
    # Survival events accept booleans and refuse other values
    assert SurvivalLabel.model_validate({"time": 3, "event": True}).event == 1
    with pytest.raises(pydantic.ValidationError, match="event must be 0"):
        SurvivalLabel(time=3.0, event=2)
    with pytest.raises(pydantic.ValidationError, match="time must be a finite number > 0"):
        SurvivalLabel(time=float("nan"), event=0)
    # Task declarations need their classes or labels, unique, and nothing of another kind
    with pytest.raises(pydantic.ValidationError, match="more than once"):
        TaskDeclaration(kind="classification", classes=["a", "a", "b"])
    with pytest.raises(pydantic.ValidationError, match="at least 2 labels"):
        TaskDeclaration(kind="segmentation")
    with pytest.raises(pydantic.ValidationError, match="only classification tasks"):
        TaskDeclaration(kind="survival", classes=["a", "b"])
    with pytest.raises(pydantic.ValidationError, match="extra"):
        TaskDeclaration.model_validate({"kind": "survival", "head": "cox"})
    # A manifest built in code is checked across fields too
    case = Case(id="c1", images={"ct": "c1.nii.gz"}, labels={"unknown-task": "x"})
    with pytest.raises(pydantic.ValidationError, match="'unknown-task' is not declared"):
        SiteManifest(site="s", tasks={}, cases=[case])


def test_cases_with_refuses_an_unknown_split(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "manifest.yaml"
    path.write_text(VALID)
    manifest = load_manifest(path)
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown split 'training'"):
        manifest.cases_with(split="training")
