"""A site's own policy: which work it accepts and how much privacy loss it tolerates.

The policy is a small file (TOML, YAML or JSON) kept by the hospital, never sent by the
coordinator. :func:`request_problems` lists every reason the site refuses a stage (a task or
modality it does not serve, no local differential privacy where the site requires it, a
weaker ``delta`` than the site accounts at, too many rounds, a larger patch than the site
accepts); :func:`enforce` raises them together. :func:`enforce_data` applies the data bounds
alone (for evaluate requests). The privacy *budget* (``max_epsilon``) is checked against
the site's ledger by :meth:`client.ledger.PrivacyLedger.check_budget`.

Example ``site-policy.toml``::

    max_epsilon = 10.0
    delta = 1e-5
    require_privacy = true
    allowed_tasks = ["lesion-class", "survival"]
    allowed_modalities = ["ct"]
    max_rounds_per_stage = 50
    max_patch_voxels = 2097152  # 128³: at most this many voxels per case (plan data.patch_size)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from client.errors import PolicyError, RequestRefused
from unicon_model.config_io import load_document, pydantic_problems
from unicon_model.schema import MAX_PATCH_VOXELS, DataSpec, Name, StageSpec

logger = logging.getLogger(__name__)


class SitePolicy(BaseModel):
    """What a site accepts to serve.

    Attributes
    ----------
    max_epsilon
        Cap on the site's total privacy loss (epsilon at ``delta``) composed over every DP
        request it ever served; ``None`` means no cap.
    delta
        The delta at which the site accounts its privacy loss. Stages with a larger
        ``privacy.delta`` are refused.
    require_privacy
        Refuse stages that do not train with local DP-SGD (``privacy.mode = "local"``).
    allowed_tasks
        Task names the site trains; ``None`` allows every task.
    allowed_modalities
        Modality names whose data the site uses; ``None`` allows every modality.
    max_rounds_per_stage
        Refuse stages with more rounds; ``None`` means no limit.
    max_patch_voxels
        Refuse plans whose ``data.patch_size`` holds more voxels (the product of its entries),
        to bound the memory one case takes at the site; ``None`` keeps the plan schema's own
        maximum, :data:`unicon_model.schema.MAX_PATCH_VOXELS` (256³).
    min_evaluation_cases
        Evaluation releases no metric over fewer cases than this (per modality route and
        task): a metric over one or two cases gives their labels away. ``None`` keeps the
        site's default, :data:`client.site.MIN_EVALUATION_CASES`; real sites should raise it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    require_privacy: bool = False
    allowed_tasks: tuple[Name, ...] | None = None
    allowed_modalities: tuple[Name, ...] | None = None
    max_rounds_per_stage: int | None = Field(default=None, ge=1)
    max_patch_voxels: int | None = Field(default=None, ge=1, le=MAX_PATCH_VOXELS)
    min_evaluation_cases: int | None = Field(default=None, ge=1, le=100000)


def default_policy() -> SitePolicy:
    """The policy of a site without a policy file: no cap, every task and modality.

    Returns
    -------
    SitePolicy
        ``SitePolicy()`` (accounting at ``delta = 1e-5``).
    """
    return SitePolicy()


def load_policy(path: str | Path) -> SitePolicy:
    """Load and validate a site policy file (``.toml``, ``.yaml``/``.yml`` or ``.json``).

    Parameters
    ----------
    path
        The policy file; its fields are the top-level keys.

    Returns
    -------
    SitePolicy
        The validated, frozen policy.

    Raises
    ------
    PolicyError
        Naming the file, with every problem found: unreadable file, unknown format, syntax
        error, unknown fields, invalid values.
    """
    path = Path(path)
    data = load_document(path, what="policy", error=PolicyError)
    try:
        policy = SitePolicy.model_validate(data)
    except ValidationError as e:
        known = ", ".join(SitePolicy.model_fields)
        problems = pydantic_problems(
            e, root="<policy>", brackets=False, unknown=f"check the spelling; known fields: {known}"
        )
        raise PolicyError(problems, str(path)) from e
    logger.info("loaded site policy %s: %s", path, policy)
    return policy


def data_problems(policy: SitePolicy, data: DataSpec) -> list[str]:
    """Every reason the site refuses a plan's data settings (empty if it accepts them).

    The plan schema already bounds them for every site (finite values, spacing > 0, a patch
    of at most :data:`~unicon_model.schema.MAX_PATCH_VOXELS`); the site's policy may lower the
    patch bound with ``max_patch_voxels``.

    Parameters
    ----------
    policy
        The site's policy.
    data
        The plan's data settings (``Plan.data``).

    Returns
    -------
    list[str]
        One message per problem, naming the plan field and the policy setting.
    """
    problems: list[str] = []
    voxels = math.prod(data.patch_size)
    if policy.max_patch_voxels is not None and voxels > policy.max_patch_voxels:
        problems.append(
            f"data.patch_size = {list(data.patch_size)} is {voxels} voxels per case, more than "
            f"the site's max_patch_voxels = {policy.max_patch_voxels}; use a smaller patch"
        )
    return problems


def enforce_data(policy: SitePolicy, data: DataSpec, *, stage: str) -> None:
    """Refuse a request (train or evaluate) whose plan's data settings the policy forbids.

    Parameters
    ----------
    policy
        The site's policy.
    data
        The plan's data settings.
    stage
        The requested stage's name (for the message).

    Raises
    ------
    RequestRefused
        Listing every reason at once.
    """
    problems = data_problems(policy, data)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise RequestRefused(
            f"the site refuses stage {stage!r} ({len(problems)} reason(s)):\n{lines}"
        )


def _scope_problems(
    policy: SitePolicy, at: str, stage_tasks: Sequence[str], stage_modalities: Sequence[str]
) -> list[str]:
    """The stage's tasks and modalities that the policy does not allow (``at`` names it)."""
    problems: list[str] = []
    scopes = (
        ("task", "allowed_tasks", stage_tasks, policy.allowed_tasks),
        ("modality", "allowed_modalities", stage_modalities, policy.allowed_modalities),
    )
    for kind, field, names, allowed in scopes:
        if allowed is None:
            continue
        problems.extend(
            f"{at}: {kind} {name!r} is not allowed by the site policy ({field} = {list(allowed)})"
            for name in names
            if name not in allowed
        )
    return problems


def request_problems(
    policy: SitePolicy,
    stage: StageSpec,
    *,
    stage_tasks: Sequence[str],
    stage_modalities: Sequence[str],
    data: DataSpec | None = None,
) -> list[str]:
    """Every reason the site refuses to train ``stage`` (empty if it accepts it).

    Parameters
    ----------
    policy
        The site's policy.
    stage
        The requested stage.
    stage_tasks
        Tasks the stage trains on the site's data (its objective tasks).
    stage_modalities
        Modalities whose data the stage uses (``Plan.stage_modalities``).
    data
        The plan's data settings, checked by :func:`data_problems`; ``None`` skips them.

    Returns
    -------
    list[str]
        One message per problem, each naming the stage, the field and the policy setting.
    """
    at = f"stage {stage.name!r}"
    problems = _scope_problems(policy, at, stage_tasks, stage_modalities)
    privacy = stage.privacy
    if policy.require_privacy and privacy.mode != "local":
        problems.append(
            f"{at}: privacy.mode is {privacy.mode!r} but the site policy requires local "
            "differential privacy (require_privacy = true); set privacy.mode = 'local'"
        )
    if privacy.mode == "local" and privacy.delta > policy.delta:
        problems.append(
            f"{at}: privacy.delta = {privacy.delta:g} is larger than the site's delta "
            f"{policy.delta:g}; use privacy.delta <= {policy.delta:g}"
        )
    if policy.max_rounds_per_stage is not None and stage.rounds > policy.max_rounds_per_stage:
        problems.append(
            f"{at}: rounds = {stage.rounds} exceeds the site's max_rounds_per_stage = "
            f"{policy.max_rounds_per_stage}"
        )
    if data is not None:
        problems += [f"{at}: {problem}" for problem in data_problems(policy, data)]
    return problems


def enforce(
    policy: SitePolicy,
    stage: StageSpec,
    *,
    stage_tasks: Sequence[str],
    stage_modalities: Sequence[str],
    data: DataSpec | None = None,
) -> None:
    """Refuse ``stage`` if the site's policy forbids it.

    Parameters
    ----------
    policy, stage, stage_tasks, stage_modalities, data
        As for :func:`request_problems`.

    Raises
    ------
    RequestRefused
        Listing every reason at once.
    """
    problems = request_problems(
        policy, stage, stage_tasks=stage_tasks, stage_modalities=stage_modalities, data=data
    )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise RequestRefused(
            f"the site refuses stage {stage.name!r} ({len(problems)} reason(s)):\n{lines}"
        )
