"""Tests of the shared document reading and pydantic error wording (:mod:`config_io`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unicon_model.config_io import (
    DocumentWording,
    document_format,
    load_document,
    parse_document,
    pydantic_fields,
    pydantic_problems,
    suffix_list,
)
from unicon_model.errors import PlanError, ProblemsError


class _Optimiser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(gt=0)


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimiser: _Optimiser


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: list[_Stage]
    rounds: int = 1

    @model_validator(mode="after")
    def _check(self) -> _Plan:
        if self.rounds > 10:
            raise ValueError("at most 10 rounds")
        return self


def _nested_error() -> ValidationError:
    """Stage 1's optimiser has a bad ``lr`` and an unknown field."""
    data = {"stages": [{"optimiser": {"lr": 1}}, {"optimiser": {"lr": -1, "momentum": 0.9}}]}
    with pytest.raises(ValidationError) as caught:
        _Plan.model_validate(data)
    return caught.value


# ---------------------------------------------------------------- suffix dispatch
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("plan.toml", 'name = "a"\nrounds = 3\n'),
        ("plan.yaml", "name: a\nrounds: 3\n"),
        ("plan.yml", "name: a\nrounds: 3\n"),
        ("plan.json", '{"name": "a", "rounds": 3}'),
        ("PLAN.YAML", "name: a\nrounds: 3\n"),
    ],
)
def test_each_suffix_is_read_by_its_own_parser(tmp_path: Path, name: str, text: str) -> None:
    # Prepare: text that only the suffix's own parser reads
    path = tmp_path / name
    path.write_text(text)
    # Execute
    data = load_document(path)
    # Assert
    assert data == {"name": "a", "rounds": 3}


def test_the_suffix_not_the_content_picks_the_parser(tmp_path: Path) -> None:
    # Prepare: TOML text in a .json file
    path = tmp_path / "plan.json"
    path.write_text('name = "a"\n')
    # Execute
    with pytest.raises(ProblemsError) as caught:
        load_document(path)
    # Assert: the JSON parser refused it
    assert str(caught.value).startswith(f"1 problem(s) in {path}:\n  - not valid JSON: Expecting")


def test_document_format_maps_allowed_suffixes_only() -> None:
    assert document_format(Path("a.TOML")) == "TOML"
    assert document_format(Path("a.yml")) == "YAML"
    assert document_format(Path("a.json"), (".yaml", ".json")) == "JSON"
    assert document_format(Path("a.toml"), (".yaml", ".json")) is None
    assert document_format(Path("a")) is None


def test_unknown_suffix_names_the_file_and_the_allowed_suffixes(tmp_path: Path) -> None:
    # Prepare: the file does not even exist: the suffix is refused before reading
    path = tmp_path / "plan.ini"
    # Execute
    with pytest.raises(PlanError) as caught:
        load_document(path, allowed=(".toml", ".json"), what="plan", error=PlanError)
    # Assert
    assert str(caught.value) == (
        f"1 problem(s) in {path}:\n  - unknown format '.ini'; use .toml or .json"
    )
    assert caught.value.source == str(path)


def test_fallback_reads_other_suffixes_in_that_format(tmp_path: Path) -> None:
    # Prepare
    good, bad = tmp_path / "plan.txt", tmp_path / "broken.cfg"
    good.write_text('name = "a"\n')
    bad.write_text("name = \n")
    wording = DocumentWording(invalid="not valid {extension}: {error}")
    # Execute
    data = load_document(good, allowed=(".json",), fallback="TOML")
    with pytest.raises(ProblemsError) as caught:
        load_document(bad, allowed=(".json",), fallback="TOML", wording=wording)
    # Assert: read as TOML, its syntax error labelled by the suffix
    assert data == {"name": "a"}
    assert caught.value.problems == ["not valid cfg: Invalid value (at line 1, column 8)"]


def test_suffix_list_reads_as_a_sentence() -> None:
    assert suffix_list((".toml", ".yaml", ".yml", ".json")) == ".toml, .yaml, .yml or .json"
    assert suffix_list((".toml", ".json")) == ".toml or .json"
    assert suffix_list((".json",)) == ".json"


# ---------------------------------------------------------------- safe parsing
def test_yaml_python_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    # Prepare: a YAML document whose python tag would create a file if it were constructed
    marker = tmp_path / "ran"
    path = tmp_path / "policy.yaml"
    path.write_text(
        "max_epsilon: !!python/object/apply:pathlib.Path.touch "
        f"[!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    # Execute
    with pytest.raises(ProblemsError) as caught:
        load_document(path, what="policy")
    # Assert: the safe loader refused the tag; nothing ran
    assert caught.value.problems[0].startswith(
        "not valid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:pathlib.Path.touch'"
    )
    assert not marker.exists()


def test_parse_document_refuses_python_tags_with_a_stricter_loader_too() -> None:
    class NoAliases(yaml.SafeLoader):
        pass

    with pytest.raises(yaml.constructor.ConstructorError, match=r"python/name:os\.getcwd"):
        parse_document("a: !!python/name:os.getcwd ''\n", "YAML", yaml_loader=NoAliases)
    with pytest.raises(ValueError, match="unknown document format 'INI'"):
        parse_document("a=1", "INI")


# ---------------------------------------------------------------- reading problems
def test_missing_file_and_non_mapping_documents_are_problems(tmp_path: Path) -> None:
    # Prepare
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    # Execute
    with pytest.raises(ProblemsError) as missing:
        load_document(tmp_path / "absent.toml")
    with pytest.raises(ProblemsError) as not_mapping:
        load_document(listed, what="policy")
    # Assert
    assert missing.value.problems == ["cannot read the file: No such file or directory"]
    assert str(not_mapping.value) == (
        f"1 problem(s) in {listed}:\n"
        "  - the policy must be a table/mapping at the top level, got list"
    )


def test_an_empty_document_is_an_empty_mapping_unless_worded_as_a_problem(
    tmp_path: Path,
) -> None:
    # Prepare
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    null = tmp_path / "null.json"
    null.write_text("null")
    strict = DocumentWording(empty="the {what} {path} is empty")
    # Execute
    data = load_document(empty)
    with pytest.raises(ProblemsError) as caught:
        load_document(null, what="plan", wording=strict)
    # Assert
    assert data == {}
    assert caught.value.problems == [f"the plan {null} is empty"]


# ---------------------------------------------------------------- pydantic wording
def test_pydantic_problems_writes_nested_paths_with_indices() -> None:
    # Execute
    problems = pydantic_problems(_nested_error())
    # Assert: one line per error, list indices in brackets, pydantic's order
    assert problems == [
        "stages[1].optimiser.lr: Input should be greater than 0",
        "stages[1].optimiser.momentum: unknown field (check the spelling)",
    ]


def test_pydantic_problems_parameters_give_each_callers_wording() -> None:
    # Execute
    dotted = pydantic_problems(
        _nested_error(),
        prefix="plan",
        brackets=False,
        unknown="check the spelling; known fields: lr",
        translate=lambda item: "must be positive" if item["type"] == "greater_than" else None,
    )
    # Assert
    assert dotted == [
        "plan.stages.1.optimiser.lr: must be positive",
        "plan.stages.1.optimiser.momentum: unknown field (check the spelling; known fields: lr)",
    ]


def test_pydantic_problems_names_the_root_for_errors_of_the_whole_value() -> None:
    # Prepare
    with pytest.raises(ValidationError) as caught:
        _Plan.model_validate({"stages": [], "rounds": 11})
    # Execute
    problems = pydantic_problems(caught.value, root="<plan>")
    fields = pydantic_fields(caught.value, prefix="stages[0]")
    # Assert: "Value error, " is dropped; the prefix stands for the empty path
    assert problems == ["<plan>: at most 10 rounds"]
    assert fields == [("stages[0]", "at most 10 rounds")]


# ---------------------------------------------------------------- the problems error
def test_problems_error_lists_every_problem_and_survives_pickling() -> None:
    # Prepare
    class PolicyLike(ProblemsError):
        source_label = "site policy"

    # Execute
    plan = PlanError(["a: bad", "b: worse"], "plan.toml")
    policy = PolicyLike(["x: bad"], "policy.toml")
    bare = ProblemsError(["only one"])
    copy = pickle.loads(pickle.dumps(plan))
    # Assert
    assert str(plan) == "2 problem(s) in plan.toml:\n  - a: bad\n  - b: worse"
    assert str(policy) == "1 problem(s) in site policy policy.toml:\n  - x: bad"
    assert str(bare) == "1 problem(s):\n  - only one"
    assert isinstance(copy, PlanError)
    assert (copy.problems, copy.source, str(copy)) == (plan.problems, "plan.toml", str(plan))
