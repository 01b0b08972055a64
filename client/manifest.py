"""The site manifest: a hospital's cases, their image files, labels and splits.

The manifest is a YAML or JSON file written by the hospital; every path in it is relative
to the manifest's folder (absolute paths are kept). Example ``manifest.yaml``::

    site: hospital-a
    tasks:
      lesion-class: {kind: classification, classes: [benign, malignant]}
      survival:     {kind: survival}                  # label: {time: >0, event: 0|1}
      lesion-seg:   {kind: segmentation, labels: [background, tumour]}
    cases:
      - id: case-001
        split: train                                  # train | val | test
        images: {ct: ct/case-001.nii.gz, pet: pet/case-001.nii.gz}
        clinical: {age: 64, stage: 2}                 # optional numeric covariates
        labels: {lesion-class: malignant, survival: {time: 523.0, event: 1},
                 lesion-seg: seg/case-001.nii.gz}

A MONAI / Medical Segmentation Decathlon datalist (``dataset.json`` with ``training``,
``validation`` and ``test`` lists of ``{"image": ..., "label": ...}``) is accepted too and
mapped to one segmentation task ``segmentation``.

:func:`load_manifest` checks the structure only (it never opens the image files, which is
the job of :func:`client.manifest_check.check_manifest`) and reports every problem at once
in one :class:`client.errors.ManifestError`, each naming the case and field and the fix.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from client.errors import ManifestError
from unicon_model.config_io import document_format, parse_document, pydantic_fields, suffix_list
from unicon_model.names import NAME_RULE, UnsafeNameError, check_name, is_valid_name

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The data splits of a site, in display order."""

Split = Literal["train", "val", "test"]
TaskKind = Literal["classification", "survival", "segmentation"]

_SUFFIXES = (".yaml", ".yml", ".json")
_TOP_LEVEL = ("site", "tasks", "cases")
_DATALIST_SECTIONS = {"training": "train", "validation": "val", "test": "test"}
_IMAGE_EXAMPLE = "images: {ct: ct/case-001.nii.gz}"

MAX_MANIFEST_BYTES = 16 << 20
"""Largest manifest file read (bytes); larger files are refused before parsing."""

MAX_MANIFEST_DEPTH = 32
"""Deepest nesting of mappings and lists a manifest may have (a real one needs about 5)."""


def _unique_names(values: list[str], field: str, example: str) -> list[str]:
    if any(not v.strip() for v in values):
        raise ValueError(f"{field} must not contain empty names")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{field} {values} list {duplicates} more than once; list each once")
    if len(values) < 2:
        raise ValueError(f"needs at least 2 {field}, got {values}; e.g. {example}")
    return values


class TaskDeclaration(BaseModel):
    """A task the site has labels for.

    Attributes
    ----------
    kind
        ``classification``, ``survival`` or ``segmentation``.
    classes
        Class names of a classification task (at least two, unique).
    labels
        Mask label names of a segmentation task, index 0 first (at least two, unique).
    """

    model_config = ConfigDict(extra="forbid")

    kind: TaskKind
    classes: list[str] = Field(default_factory=list, validate_default=True)
    labels: list[str] = Field(default_factory=list, validate_default=True)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: list[str], info: ValidationInfo) -> list[str]:
        kind = info.data.get("kind")
        if kind == "classification":
            return _unique_names(value, "classes", "classes: [benign, malignant]")
        if value and kind is not None:
            raise ValueError(f"only classification tasks list classes; this task is {kind}")
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str], info: ValidationInfo) -> list[str]:
        kind = info.data.get("kind")
        if kind == "segmentation":
            return _unique_names(value, "labels", "labels: [background, tumour]")
        if value and kind is not None:
            raise ValueError(f"only segmentation tasks list mask labels; this task is {kind}")
        return value


class SurvivalLabel(BaseModel):
    """Time to event or censoring, and whether the event was observed.

    Attributes
    ----------
    time
        Follow-up time (> 0, finite; the unit is the site's, e.g. days).
    event
        ``1`` if the event was observed at ``time``, ``0`` if censored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: float
    event: int

    @field_validator("time")
    @classmethod
    def _check_time(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"time must be a finite number > 0, got {value}")
        return value

    @field_validator("event", mode="before")
    @classmethod
    def _bool_event(cls, value: Any) -> Any:
        return int(value) if isinstance(value, bool) else value

    @field_validator("event")
    @classmethod
    def _check_event(cls, value: int) -> int:
        if value not in (0, 1):
            raise ValueError(f"event must be 0 (censored) or 1 (event observed), got {value}")
        return value


class Case(BaseModel):
    """One case of the site.

    Attributes
    ----------
    id
        Unique case identifier.
    split
        ``train``, ``val`` or ``test``.
    images
        Image key (modality input, e.g. ``ct``) -> file or DICOM folder, relative to the
        manifest's folder.
    clinical
        Numeric covariates (e.g. ``age``), used by survival tasks.
    labels
        Task name -> label: a class name (classification), a :class:`SurvivalLabel`
        (survival) or a mask file path (segmentation).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    split: Split = "train"
    images: dict[str, str]
    clinical: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str | SurvivalLabel] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the case id must not be empty")
        return value

    @field_validator("images")
    @classmethod
    def _check_images(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError(f"the case has no images; list at least one, e.g. {_IMAGE_EXAMPLE}")
        empty = [key for key, path in value.items() if not key.strip() or not path.strip()]
        if empty:
            raise ValueError(f"image keys and paths must not be empty (at {empty})")
        return value

    @field_validator("clinical", "labels", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class SiteManifest(BaseModel):
    """A validated site manifest.

    Attributes
    ----------
    site
        The site's name; it keys the site's state directory, so it follows the one name
        rule (:data:`unicon_model.names.NAME_RULE`).
    tasks
        Task name -> declaration.
    cases
        Every case, in file order.
    root
        Folder of the manifest file; relative paths resolve against it. Not serialised.
    """

    model_config = ConfigDict(extra="forbid")

    site: str
    tasks: dict[str, TaskDeclaration]
    cases: list[Case]
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("site")
    @classmethod
    def _check_site(cls, value: str) -> str:
        try:
            return check_name(value, "site name")
        except UnsafeNameError as e:
            raise ValueError(f"{e}; e.g. site: hospital-a") from None

    @model_validator(mode="after")
    def _check_consistency(self) -> SiteManifest:
        problems = [str(p) for p in _typed_problems(self.tasks, self.cases)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def modalities(self) -> list[str]:
        """Sorted image keys present in at least one case."""
        return sorted({key for case in self.cases for key in case.images})

    def resolve(self, relative: str) -> Path:
        """The path of a file named in the manifest.

        Parameters
        ----------
        relative
            A path as written in the manifest.

        Returns
        -------
        Path
            ``root / relative``, or ``relative`` itself when it is absolute.
        """
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.root / path

    def cases_with(
        self, task: str | None = None, modality: str | None = None, split: str | None = None
    ) -> list[Case]:
        """Cases with a label for ``task``, an image ``modality`` and in ``split``.

        Parameters
        ----------
        task
            Keep cases labelled for this task (``None``: any).
        modality
            Keep cases having this image key (``None``: any).
        split
            Keep cases of this split (``None``: any).

        Returns
        -------
        list[Case]
            Matching cases, in manifest order.

        Raises
        ------
        ValueError
            If ``split`` is not ``train``, ``val`` or ``test``.
        """
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
        return [
            case
            for case in self.cases
            if (task is None or task in case.labels)
            and (modality is None or modality in case.images)
            and (split is None or case.split == split)
        ]

    def counts(self) -> dict[str, Any]:
        """Case counts per split, per task, per modality and per class.

        Returns
        -------
        dict
            ``{"cases": {split: n}, "tasks": {task: {split: n}}, "modalities": {modality:
            {split: n}}, "classes": {task: {class: n}}, "unlabelled": {split: n}}``; every
            split is present (0 when empty); ``classes`` counts train cases of
            classification tasks; ``unlabelled`` counts cases with images and no label,
            which only self-supervised stages (``reconstruction`` tasks) train on.
        """

        def per_split() -> dict[str, int]:
            return dict.fromkeys(SPLITS, 0)

        cases = per_split()
        tasks = {name: per_split() for name in self.tasks}
        modalities = {name: per_split() for name in self.modalities}
        classes = {
            name: dict.fromkeys(task.classes, 0)
            for name, task in self.tasks.items()
            if task.kind == "classification"
        }
        unlabelled = per_split()
        for case in self.cases:
            cases[case.split] += 1
            if not case.labels:
                unlabelled[case.split] += 1
            for key in case.images:
                modalities[key][case.split] += 1
            for name, label in case.labels.items():
                if name in tasks:
                    tasks[name][case.split] += 1
                if name in classes and case.split == "train" and isinstance(label, str):
                    classes[name][label] = classes[name].get(label, 0) + 1
        return {
            "cases": cases,
            "tasks": tasks,
            "modalities": modalities,
            "classes": classes,
            "unlabelled": unlabelled,
        }


# ---------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class ManifestProblem:
    """One problem of a manifest, located by case and field.

    Attributes
    ----------
    field
        Dotted field path (``labels.lesion-class``, ``tasks.survival.kind``); empty when the
        problem concerns the whole file.
    message
        What is wrong and how to fix it.
    case
        The case id, when the problem is within a case that has one.
    index
        Position of the case in ``cases``, when within a case.
    """

    field: str
    message: str
    case: str | None = None
    index: int | None = None

    @property
    def where(self) -> str | None:
        """``case 'id' (cases[i])``, ``cases[i]`` or ``None`` outside the cases."""
        if self.index is None:
            return f"case {self.case!r}" if self.case is not None else None
        if self.case is None:
            return f"cases[{self.index}]"
        return f"case {self.case!r} (cases[{self.index}])"

    def __str__(self) -> str:
        where = self.where
        if where is None:
            return f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}.{self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _translate(error: ErrorDetails) -> str | None:
    """A readable message with the fix for a pydantic error (``None``: pydantic's own)."""
    loc = [str(part) for part in error["loc"]]
    kind = error["type"]
    value = error.get("input")
    message: str | None = None
    if kind == "missing":
        hints = {
            "images": f"list the case's image files, e.g. {_IMAGE_EXAMPLE}",
            "id": "give the case a unique id, e.g. id: case-001",
            "kind": "set kind: classification, survival or segmentation",
            "time": "give the follow-up time, e.g. {time: 523.0, event: 1}",
            "event": "give the event indicator 0 (censored) or 1, e.g. {time: 523.0, event: 1}",
        }
        message = "is required" + (f"; {hints[loc[-1]]}" if loc and loc[-1] in hints else "")
    elif kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        what = "split" if loc and loc[-1] == "split" else "value"
        message = f"unknown {what} {_short(value)}; use {expected}"
    elif kind == "string_type":
        message = f"must be a string, got {_short(value)} (quote it in YAML)"
    elif kind in {"dict_type", "model_type", "model_attributes_type"}:
        message = f"must be a mapping, got {_short(value)}"
    elif kind == "list_type":
        message = f"must be a list, got {_short(value)}"
    elif kind in {"float_parsing", "float_type", "finite_number"}:
        message = f"must be a number, got {_short(value)}"
    elif kind in {"int_parsing", "int_type", "int_from_float"}:
        message = f"must be an integer, got {_short(value)}"
    return message


def _validation_problems(
    error: ValidationError,
    model: type[BaseModel],
    *,
    prefix: str = "",
    case: str | None = None,
    index: int | None = None,
) -> list[ManifestProblem]:
    known = ", ".join(name for name in model.model_fields if name != "root")
    fields = pydantic_fields(
        error,
        prefix=prefix,
        brackets=False,
        unknown=f"check the spelling; known fields: {known}",
        translate=_translate,
    )
    return [ManifestProblem(field, message, case, index) for field, message in fields]


def _label_problem(declaration: TaskDeclaration, label: Any) -> str | None:
    """Why ``label`` is not a valid label of the declared task (``None`` if it is)."""
    if declaration.kind == "classification":
        classes = declaration.classes
        if not isinstance(label, str):
            return f"must be one of the declared classes {classes} as a string, got {_short(label)}"
        if label not in classes:
            close = difflib.get_close_matches(label, classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{label!r} is not one of the declared classes {classes}{hint}"
    elif declaration.kind == "survival":
        if not isinstance(label, SurvivalLabel):
            return (
                "a survival label must be a mapping {time: <follow-up time > 0>, event: 0 or 1}, "
                f"got {_short(label)}"
            )
    elif not isinstance(label, str) or not label.strip():
        return (
            f"a segmentation label must be the path of a mask file (a string), got {_short(label)}"
        )
    return None


def _undeclared(task: str, declared: list[str]) -> str:
    return (
        f"task {task!r} is not declared under tasks (declared: {declared}); declare it or "
        "remove the label"
    )


def _typed_problems(
    tasks: Mapping[str, TaskDeclaration], cases: list[Case]
) -> list[ManifestProblem]:
    """Cross-field problems of validated cases: labels vs declared tasks, duplicate ids."""
    problems: list[ManifestProblem] = []
    first: dict[str, int] = {}
    for index, case in enumerate(cases):
        if case.id in first:
            problems.append(
                ManifestProblem(
                    "id",
                    f"duplicate case id (cases[{first[case.id]}] has the same id); make ids unique",
                    case.id,
                    index,
                )
            )
        else:
            first[case.id] = index
        for task, label in case.labels.items():
            declaration = tasks.get(task)
            if declaration is None:
                problem: str | None = _undeclared(task, list(tasks))
            else:
                problem = _label_problem(declaration, label)
            if problem is not None:
                problems.append(ManifestProblem(f"labels.{task}", problem, case.id, index))
    return problems


# ---------------------------------------------------------------------------- raw data
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
                    f"must be a mapping with kind, e.g. {{kind: survival}}, got {_short(value)}",
                )
            )
            continue
        try:
            tasks[name] = TaskDeclaration.model_validate(value)
        except ValidationError as e:
            problems += _validation_problems(e, TaskDeclaration, prefix=f"tasks.{name}")
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
        message = f"must be a mapping task -> label, got {_short(raw)}"
        return {}, [ManifestProblem("labels", message, case, index)]
    labels: dict[str, str | SurvivalLabel] = {}
    problems: list[ManifestProblem] = []
    for task, value in raw.items():
        field = f"labels.{task}"
        declaration = tasks.get(task) if isinstance(task, str) else None
        if declaration is None:
            if task not in declared:  # a declared but invalid task is reported under tasks
                message = _undeclared(task, declared)
                problems.append(ManifestProblem(field, message, case, index))
            continue
        label: Any = value
        if declaration.kind == "survival" and isinstance(value, dict):
            try:
                label = SurvivalLabel.model_validate(value)
            except ValidationError as e:
                problems += _validation_problems(
                    e, SurvivalLabel, prefix=field, case=case, index=index
                )
                continue
        problem = _label_problem(declaration, label)
        if problem is not None:
            problems.append(ManifestProblem(field, problem, case, index))
        else:
            labels[task] = label
    return labels, problems


def _check_cases(
    raw: Any, tasks: Mapping[str, TaskDeclaration], declared: list[str]
) -> tuple[list[Case], list[ManifestProblem]]:
    if not isinstance(raw, list):
        return [], [ManifestProblem("cases", f"must be a list of cases, got {_short(raw)}")]
    cases: list[Case] = []
    problems: list[ManifestProblem] = []
    first: dict[str, int] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            message = f"must be a mapping with id, split, images and labels, got {_short(item)}"
            problems.append(ManifestProblem("", message, None, index))
            continue
        raw_id = item.get("id")
        case_id = raw_id if isinstance(raw_id, str) and raw_id.strip() else None
        found: list[ManifestProblem] = []
        if case_id is not None:
            if case_id in first:
                message = (
                    f"duplicate case id (cases[{first[case_id]}] has the same id); make ids unique"
                )
                found.append(ManifestProblem("id", message, case_id, index))
            else:
                first[case_id] = index
        labels, label_problems = _check_case_labels(
            item.get("labels"), tasks, declared, case_id, index
        )
        found += label_problems
        try:
            case = Case.model_validate({**item, "labels": labels})
        except ValidationError as e:
            found += _validation_problems(e, Case, case=case_id, index=index)
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


def _check_top_level(data: Any, root: Path) -> ManifestParse:
    """Validate a parsed manifest, collecting every problem."""
    if not isinstance(data, dict):
        message = (
            f"the manifest must be a mapping with {', '.join(_TOP_LEVEL)} at the top level, "
            f"got {type(data).__name__}"
        )
        return ManifestParse(None, [ManifestProblem("", message)])
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
        problems.append(ManifestProblem("site", f"must be a non-empty string, got {_short(site)}"))
    elif "site" in data and not is_valid_name(site):
        message = (
            f"site name {_short(site)} is not a valid name: use {NAME_RULE} "
            "(no capitals, spaces, dots, invisible or bidi characters), e.g. site: hospital-a"
        )
        problems.append(ManifestProblem("site", message))
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


# ---------------------------------------------------------------------------- datalists
def _is_datalist(data: Any) -> bool:
    return isinstance(data, dict) and "training" in data and "cases" not in data


def _datalist_labels(raw: Any) -> tuple[list[str] | None, list[ManifestProblem]]:
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return None, [ManifestProblem("labels", 'must be a mapping {"0": "background", ...}')]
    try:
        ordered = sorted((int(key), str(name)) for key, name in raw.items())
    except (TypeError, ValueError):
        message = f"keys must be integers as strings, e.g. {{'0': 'background'}}, got {list(raw)}"
        return None, [ManifestProblem("labels", message)]
    if [key for key, _ in ordered] != list(range(len(ordered))):
        message = f"keys must be 0..{len(ordered) - 1} without gaps, got {[k for k, _ in ordered]}"
        return None, [ManifestProblem("labels", message)]
    return [name for _, name in ordered], []


def _image_keys(data: Mapping[str, Any]) -> list[str]:
    modality = data.get("modality")
    if isinstance(modality, dict) and modality:
        try:
            names = [
                str(v).strip().lower() for _, v in sorted(modality.items(), key=lambda i: int(i[0]))
            ]
        except (TypeError, ValueError):
            names = [str(v).strip().lower() for v in modality.values()]
        if all(names) and len(set(names)) == len(names):
            return names
    return ["image"]


def _datalist_site(name: Any, path: Path) -> tuple[str, list[ManifestProblem]]:
    """The site name of a datalist: its ``name`` (else the file stem) in the name rule's case.

    Only letter case, spaces and dots are adapted (``Task02_Heart`` -> ``task02_heart``);
    any other character outside the name rule (e.g. zero-width or bidi controls) is refused.
    """
    given = name.strip() if isinstance(name, str) and name.strip() else path.stem
    field = "name" if isinstance(name, str) and name.strip() else ""
    site = re.sub(r"[\s.]+", "-", given.lower()).strip("-")
    if is_valid_name(site):
        if site != given:
            logger.info("%s: using the site name %r for the datalist %r", path, site, given)
        return site, []
    what = f"the datalist name {_short(given)}" if field else f"the file name stem {given!r}"
    message = (
        f"{what} gives no valid site name: use {NAME_RULE}; rename it, or write a site "
        "manifest with site: <name>"
    )
    return given, [ManifestProblem(field, message)]


def _case_id(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".npy", ".dcm", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _from_datalist(
    data: Mapping[str, Any], path: Path
) -> tuple[dict[str, Any], list[ManifestProblem]]:
    """A MONAI / Decathlon datalist as a raw site manifest."""
    problems: list[ManifestProblem] = []
    labels, label_problems = _datalist_labels(data.get("labels"))
    problems += label_problems
    keys = _image_keys(data)
    site, site_problems = _datalist_site(data.get("name"), path)
    problems += site_problems
    cases: list[dict[str, Any]] = []
    labelled = False
    for section, split in _DATALIST_SECTIONS.items():
        items = data.get(section)
        if items is None:
            continue
        if not isinstance(items, list):
            problems.append(ManifestProblem(section, f"must be a list, got {_short(items)}"))
            continue
        for i, item in enumerate(items):
            where = f"{section}[{i}]"
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or "image" not in item:
                message = f'must be {{"image": PATH, "label": PATH}} or a path, got {_short(item)}'
                problems.append(ManifestProblem(where, message))
                continue
            image = item["image"]
            paths = image if isinstance(image, list) else [image]
            if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
                message = f"must be a path or a list of paths, got {_short(image)}"
                problems.append(ManifestProblem(f"{where}.image", message))
                continue
            if len(paths) == 1:
                images = {keys[0] if len(keys) == 1 else "image": paths[0]}
            elif len(paths) == len(keys):
                images = dict(zip(keys, paths, strict=True))
            else:
                images = {f"image{j}": p for j, p in enumerate(paths)}
            case: dict[str, Any] = {"id": _case_id(paths[0]), "split": split, "images": images}
            if item.get("label") is not None:
                case["labels"] = {"segmentation": item["label"]}
                labelled = True
            cases.append(case)
    tasks: dict[str, Any] = {}
    if labels is not None:
        tasks["segmentation"] = {"kind": "segmentation", "labels": labels}
    elif labelled and not label_problems:
        logger.warning(
            "%s: the datalist has masks but no 'labels' mapping; assuming binary masks "
            "[background, foreground]",
            path,
        )
        tasks["segmentation"] = {"kind": "segmentation", "labels": ["background", "foreground"]}
    return {"site": site, "tasks": tasks, "cases": cases}, problems


# ---------------------------------------------------------------------------- loading
class _RefusedYAMLError(yaml.MarkedYAMLError):
    """A YAML construct a manifest may not use (an alias, or nesting beyond the limit)."""


class _NoAliasDumper(yaml.SafeDumper):
    """Writes every repeated object in full: manifests with aliases are refused on reading."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def manifest_yaml(data: Mapping[str, Any]) -> str:
    """YAML text of a manifest without anchors or aliases (which :func:`load_manifest` refuses).

    Parameters
    ----------
    data
        The manifest's plain content (``site``, ``tasks``, ``cases``).
    """
    return yaml.dump(dict(data), Dumper=_NoAliasDumper, sort_keys=False)


class _ManifestYAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and bounds the nesting depth.

    Aliases (``*name``) are what alias bombs ("billion laughs") are made of, and a manifest
    never needs one; nesting is bounded so that composing never recurses deeply.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def _too_deep_error(self, mark: Any) -> _RefusedYAMLError:
        return _RefusedYAMLError(
            problem=f"the content is nested more than {MAX_MANIFEST_DEPTH} levels deep; a "
            "manifest needs only a few levels",
            problem_mark=mark,
        )

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 (PyYAML's name)
        # stop the scanner itself: deep flow nesting ([[[...) makes its look-ahead quadratic
        if self.flow_level >= MAX_MANIFEST_DEPTH:
            raise self._too_deep_error(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RefusedYAMLError(
                problem=f"found the alias *{event.anchor}; YAML aliases are not allowed in a "
                "manifest (write the value out in full)",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_MANIFEST_DEPTH:
                raise self._too_deep_error(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_deep(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists/mappings more than ``limit`` levels deep (iterative)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (so that a larger file shows as too large)."""
    with path.open("rb") as handle:
        return handle.read(limit + 1)


def _parse(path: Path) -> tuple[Any, list[ManifestProblem]]:
    """The parsed file, or the problem preventing it."""
    kind = document_format(path, _SUFFIXES)
    if not path.exists():
        return None, [ManifestProblem("", f"the manifest file {path} does not exist")]
    if path.is_dir():
        message = f"{path} is a folder; pass the manifest file, e.g. {path / 'manifest.yaml'}"
        return None, [ManifestProblem("", message)]
    if not path.is_file():
        return None, [ManifestProblem("", f"{path} is not a regular file; pass the manifest file")]
    if kind is None:
        message = f"{path}: unknown manifest format {path.suffix!r}; use {suffix_list(_SUFFIXES)}"
        return None, [ManifestProblem("", message)]
    try:
        raw = _read_bounded(path, MAX_MANIFEST_BYTES)
    except OSError as e:
        return None, [ManifestProblem("", f"cannot read {path}: {e.strerror or e}")]
    if len(raw) > MAX_MANIFEST_BYTES:
        message = (
            f"{path} is larger than {MAX_MANIFEST_BYTES // (1 << 20)} MiB, the limit for a "
            "manifest; list the cases only (image data belongs in the image files)"
        )
        return None, [ManifestProblem("", message)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [ManifestProblem("", f"cannot read {path}: not UTF-8 text ({e.reason})")]
    try:
        # _ManifestYAMLLoader is a SafeLoader: no Python objects, no aliases, bounded depth
        data = parse_document(text, kind, yaml_loader=_ManifestYAMLLoader)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        return None, [ManifestProblem("", f"{path.name} is not valid JSON ({where}): {e.msg}")]
    except _RefusedYAMLError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return None, [ManifestProblem("", f"{path} is refused{where}: {e.problem}")]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e)
        return None, [ManifestProblem("", f"{path.name} is not valid YAML{where}: {reason}")]
    except RecursionError:
        data = None
        deep = True
    else:
        deep = _too_deep(data, MAX_MANIFEST_DEPTH)
    if deep:
        message = (
            f"{path} is refused: its content is nested more than {MAX_MANIFEST_DEPTH} levels "
            "deep; a manifest needs only a few levels"
        )
        return None, [ManifestProblem("", message)]
    if data is None:
        return None, [ManifestProblem("", f"{path.name} is empty; write site, tasks and cases")]
    return data, []


def validate_manifest(path: str | Path) -> tuple[SiteManifest | None, list[ManifestProblem]]:
    """Read and validate a manifest, returning every problem instead of raising.

    Parameters
    ----------
    path
        The manifest file (``.yaml``, ``.yml`` or ``.json``; a MONAI/Decathlon datalist JSON
        is accepted).

    Returns
    -------
    manifest
        The manifest, or ``None`` when there is any problem.
    problems
        Every structural problem, each naming the case and field.
    """
    result = parse_manifest(path)
    return result.manifest, result.problems


def parse_manifest(path: str | Path) -> ManifestParse:
    """Read and validate a manifest, keeping the valid part when there are problems.

    ``unicon site check`` uses the valid part to check the files of every case whose entry
    is valid in the same run that reports the manifest's field errors.

    Parameters
    ----------
    path
        The manifest file (``.yaml``, ``.yml`` or ``.json``; a MONAI/Decathlon datalist JSON
        is accepted).

    Returns
    -------
    ManifestParse
        The manifest (``None`` on any problem), every problem, and the valid part.
    """
    path = Path(path)
    data, problems = _parse(path)
    if problems:
        return ManifestParse(None, problems)
    if _is_datalist(data):
        data, problems = _from_datalist(data, path)
        if problems:
            result = _check_top_level(data, path.absolute().parent)
            named = any(p.field in ("name", "") and "site name" in p.message for p in problems)
            rest = [p for p in result.problems if not (named and p.field == "site")]
            return ManifestParse(None, problems + rest, result.parsed, False)
    return _check_top_level(data, path.absolute().parent)


def load_manifest(path: str | Path) -> SiteManifest:
    """Load and validate a site manifest; image files are not opened.

    Parameters
    ----------
    path
        The manifest file (``.yaml``, ``.yml`` or ``.json``), or a MONAI / Medical
        Segmentation Decathlon datalist JSON.

    Returns
    -------
    SiteManifest
        With ``root`` set to the manifest's folder.

    Raises
    ------
    ManifestError
        Listing every problem at once (missing or unreadable file, syntax error, wrong
        types, unknown split, labels of undeclared tasks, invalid labels, duplicate ids,
        cases without images), each naming the case and field.
    """
    manifest, problems = validate_manifest(path)
    if manifest is None:
        raise ManifestError([str(p) for p in problems], source=str(path))
    counts = manifest.counts()["cases"]
    logger.info(
        "loaded manifest %s: site %s, %d task(s), %d case(s) (%s)",
        path,
        manifest.site,
        len(manifest.tasks),
        len(manifest.cases),
        ", ".join(f"{split} {n}" for split, n in counts.items()),
    )
    return manifest
