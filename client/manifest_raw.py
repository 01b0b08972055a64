"""Structural checks of a parsed manifest's raw data, collecting every problem at once.

:func:`check_top_level` validates the plain data read from a manifest file (mappings and
lists, before any model is built) field by field and case by case, so that one run reports
every problem, each naming the case and field, and keeps the valid part
(:class:`ManifestParse`) for ``unicon site check``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from client.manifest_models import (
    Case,
    SiteManifest,
    SurvivalLabel,
    TaskDeclaration,
    label_problem,
    undeclared,
)
from client.manifest_problems import ManifestProblem, duplicate_id, short, validation_problems
from unicon_model.names import NAME_RULE, is_valid_name

_TOP_LEVEL = ("site", "tasks", "cases")


def _check_tasks(
    raw: Any,
) -> tuple[dict[str, TaskDeclaration], list[str], list[ManifestProblem]]:
    """Valid declarations, names of every declared task (valid or not), problems."""
    if not isinstance(raw, dict):
        example = "tasks: {lesion-class: {kind: classification, classes: [benign, malignant]}}"
        return {}, [], [ManifestProblem("tasks", f"must be a mapping, e.g. {example}")]
    tasks: dict[str, TaskDeclaration] = {}
    problems: list[ManifestProblem] = []
    for name, value in raw.items():
        if not isinstance(name, str) or not name.strip():
            problems.append(ManifestProblem("tasks", f"task name {name!r} must be a string"))
            continue
        if not isinstance(value, dict):
            problems.append(
                ManifestProblem(
                    f"tasks.{name}",
                    f"must be a mapping with kind, e.g. {{kind: survival}}, got {short(value)}",
                )
            )
            continue
        try:
            tasks[name] = TaskDeclaration.model_validate(value)
        except ValidationError as e:
            problems += validation_problems(e, TaskDeclaration, prefix=f"tasks.{name}")
    return tasks, [n for n in raw if isinstance(n, str)], problems


def _check_case_labels(
    raw: Any,
    tasks: Mapping[str, TaskDeclaration],
    declared: list[str],
    case: str | None,
    index: int,
) -> tuple[dict[str, str | SurvivalLabel], list[ManifestProblem]]:
    """Typed labels of one raw case and the problems of the others."""
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        message = f"must be a mapping task -> label, got {short(raw)}"
        return {}, [ManifestProblem("labels", message, case, index)]
    labels: dict[str, str | SurvivalLabel] = {}
    problems: list[ManifestProblem] = []
    for task, value in raw.items():
        field = f"labels.{task}"
        declaration = tasks.get(task) if isinstance(task, str) else None
        if declaration is None:
            if task not in declared:  # a declared but invalid task is reported under tasks
                message = undeclared(task, declared)
                problems.append(ManifestProblem(field, message, case, index))
            continue
        label: Any = value
        if declaration.kind == "survival" and isinstance(value, dict):
            try:
                label = SurvivalLabel.model_validate(value)
            except ValidationError as e:
                problems += validation_problems(
                    e, SurvivalLabel, prefix=field, case=case, index=index
                )
                continue
        problem = label_problem(declaration, label)
        if problem is not None:
            problems.append(ManifestProblem(field, problem, case, index))
        else:
            labels[task] = label
    return labels, problems


def _check_cases(
    raw: Any, tasks: Mapping[str, TaskDeclaration], declared: list[str]
) -> tuple[list[Case], list[ManifestProblem]]:
    if not isinstance(raw, list):
        return [], [ManifestProblem("cases", f"must be a list of cases, got {short(raw)}")]
    cases: list[Case] = []
    problems: list[ManifestProblem] = []
    first: dict[str, int] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            message = f"must be a mapping with id, split, images and labels, got {short(item)}"
            problems.append(ManifestProblem("", message, None, index))
            continue
        raw_id = item.get("id")
        case_id = raw_id if isinstance(raw_id, str) and raw_id.strip() else None
        found: list[ManifestProblem] = []
        duplicate = None if case_id is None else duplicate_id(first, case_id, index)
        if duplicate is not None:
            found.append(duplicate)
        labels, label_problems = _check_case_labels(
            item.get("labels"), tasks, declared, case_id, index
        )
        found += label_problems
        try:
            case = Case.model_validate({**item, "labels": labels})
        except ValidationError as e:
            found += validation_problems(e, Case, case=case_id, index=index)
        else:
            if not found:
                cases.append(case)
        problems += found
    return cases, problems


@dataclass(frozen=True)
class ManifestParse:
    """The outcome of :func:`parse_manifest`: the manifest, or as much of it as is valid.

    Attributes
    ----------
    manifest
        The validated manifest; ``None`` when there is any problem.
    problems
        Every structural problem, each naming the case and field.
    parsed
        The valid part even when there are problems: the valid task declarations and every
        case whose entry is valid (unvalidated ``site`` and ``root`` kept as given). ``None``
        when the file itself could not be read or parsed.
    complete
        Whether ``parsed`` holds every declared task and every case (only top-level fields
        such as ``site`` may have problems), so that per-task counts are meaningful.
    """

    manifest: SiteManifest | None
    problems: list[ManifestProblem]
    parsed: SiteManifest | None = None
    complete: bool = False


def _top_level_problems(data: Mapping[str, Any]) -> list[ManifestProblem]:
    """Problems of the top-level fields: unknown or missing ones, and the site name."""
    problems: list[ManifestProblem] = []
    for key in data:
        if key not in _TOP_LEVEL:
            message = f"unknown field (check the spelling; known fields: {', '.join(_TOP_LEVEL)})"
            problems.append(ManifestProblem(str(key), message))
    for key, hint in (
        ("site", "the site's name, e.g. site: hospital-a"),
        ("tasks", "the tasks the site has labels for, e.g. tasks: {survival: {kind: survival}}"),
        ("cases", "the list of cases"),
    ):
        if key not in data:
            problems.append(ManifestProblem(key, f"is required: {hint}"))
    site = data.get("site")
    if "site" in data and (not isinstance(site, str) or not site.strip()):
        problems.append(ManifestProblem("site", f"must be a non-empty string, got {short(site)}"))
    elif "site" in data and not is_valid_name(site):
        message = (
            f"site name {short(site)} is not a valid name: use {NAME_RULE} "
            "(no capitals, spaces, dots, invisible or bidi characters), e.g. site: hospital-a"
        )
        problems.append(ManifestProblem("site", message))
    return problems


def check_top_level(data: Any, root: Path) -> ManifestParse:
    """Validate a parsed manifest, collecting every problem.

    Parameters
    ----------
    data
        The manifest file's parsed content.
    root
        The manifest's folder (the manifest's ``root``).

    Returns
    -------
    ManifestParse
        The manifest (``None`` on any problem), every problem, and the valid part.
    """
    if not isinstance(data, dict):
        message = (
            f"the manifest must be a mapping with {', '.join(_TOP_LEVEL)} at the top level, "
            f"got {type(data).__name__}"
        )
        return ManifestParse(None, [ManifestProblem("", message)])
    problems = _top_level_problems(data)
    site = data.get("site")
    tasks, declared, task_problems = _check_tasks(data.get("tasks", {}))
    problems += task_problems
    cases, case_problems = _check_cases(data.get("cases", []), tasks, declared)
    problems += case_problems
    if problems:
        parsed = SiteManifest.model_construct(
            site=site if isinstance(site, str) else "", tasks=tasks, cases=cases, root=root
        )
        complete = not task_problems and not case_problems and "tasks" in data and "cases" in data
        return ManifestParse(None, problems, parsed, complete)
    # the cases are validated instances already: pydantic does not validate them again
    manifest = SiteManifest(site=str(site), tasks=tasks, cases=cases, root=root)
    return ManifestParse(manifest, [], manifest, True)
