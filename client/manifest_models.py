"""The validated site manifest: its pydantic models and their cross-field checks.

:class:`SiteManifest` holds the site's name, its declared tasks (:class:`TaskDeclaration`)
and its cases (:class:`Case`, with :class:`SurvivalLabel` labels of survival tasks). Built
directly, it checks every label against the declared tasks and that case ids are unique;
reading a manifest file (:func:`client.manifest.load_manifest`) reports every problem at
once instead.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from client.manifest_problems import IMAGE_EXAMPLE, ManifestProblem, duplicate_id, short
from unicon_model.names import UnsafeNameError, check_name

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The data splits of a site, in display order."""

Split = Literal["train", "val", "test"]
TaskKind = Literal["classification", "survival", "segmentation"]


def _unique_names(values: list[str], field: str, example: str) -> list[str]:
    if any(not v.strip() for v in values):
        raise ValueError(f"{field} must not contain empty names")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{field} {values} list {duplicates} more than once; list each once")
    if len(values) < 2:
        raise ValueError(f"needs at least 2 {field}, got {values}; e.g. {example}")
    return values


_NAME_LISTS: dict[str, tuple[str, str, str]] = {
    "classes": ("classification", "classes", "classes: [benign, malignant]"),
    "labels": ("segmentation", "mask labels", "labels: [background, tumour]"),
}
"""Per name-list field of :class:`TaskDeclaration`: the task kind that lists it, how errors
name it, and an example."""


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

    @field_validator("classes", "labels")
    @classmethod
    def _check_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        field = info.field_name or ""
        owner, listed, example = _NAME_LISTS[field]
        kind = info.data.get("kind")
        if kind == owner:
            return _unique_names(value, field, example)
        if value and kind is not None:
            raise ValueError(f"only {owner} tasks list {listed}; this task is {kind}")
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
            raise ValueError(f"the case has no images; list at least one, e.g. {IMAGE_EXAMPLE}")
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
        problems = [str(p) for p in typed_problems(self.tasks, self.cases)]
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


def label_problem(declaration: TaskDeclaration, label: Any) -> str | None:
    """Why ``label`` is not a valid label of the declared task (``None`` if it is)."""
    if declaration.kind == "classification":
        classes = declaration.classes
        if not isinstance(label, str):
            return f"must be one of the declared classes {classes} as a string, got {short(label)}"
        if label not in classes:
            close = difflib.get_close_matches(label, classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{label!r} is not one of the declared classes {classes}{hint}"
    elif declaration.kind == "survival":
        if not isinstance(label, SurvivalLabel):
            return (
                "a survival label must be a mapping {time: <follow-up time > 0>, event: 0 or 1}, "
                f"got {short(label)}"
            )
    elif not isinstance(label, str) or not label.strip():
        return (
            f"a segmentation label must be the path of a mask file (a string), got {short(label)}"
        )
    return None


def undeclared(task: str, declared: list[str]) -> str:
    """The message for a label of ``task``, which is not among the ``declared`` tasks."""
    return (
        f"task {task!r} is not declared under tasks (declared: {declared}); declare it or "
        "remove the label"
    )


def typed_problems(
    tasks: Mapping[str, TaskDeclaration], cases: list[Case]
) -> list[ManifestProblem]:
    """Cross-field problems of validated cases: labels vs declared tasks, duplicate ids."""
    problems: list[ManifestProblem] = []
    first: dict[str, int] = {}
    for index, case in enumerate(cases):
        duplicate = duplicate_id(first, case.id, index)
        if duplicate is not None:
            problems.append(duplicate)
        for task, label in case.labels.items():
            declaration = tasks.get(task)
            if declaration is None:
                problem: str | None = undeclared(task, list(tasks))
            else:
                problem = label_problem(declaration, label)
            if problem is not None:
                problems.append(ManifestProblem(f"labels.{task}", problem, case.id, index))
    return problems
