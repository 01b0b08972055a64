"""The ``unet`` baseline of ``unicon simulate --compare``: a plain MONAI U-Net, centralised.

What a user would pick instead of UNICON for a segmentation task: a MONAI
:class:`~monai.networks.nets.BasicUNet` trained centrally on the pooled training cases of
every site, one network per segmentation route ``task@modality`` of the plan (CT input for
``lesion-seg@ct``; CT and PET stacked for ``lesion-seg@pet``, on the sites that have PET).

- Data: each site's cases read with :func:`client.data.build_dataset`, so the network sees
  exactly the preprocessed volumes (patch size, spacing, CT window, channel order) that
  UNICON's sites train and evaluate on.
- Training: DiceCE loss (softmax, one-hot targets), Adam, random flips along each spatial
  axis (MONAI ``RandFlipd`` on image and mask together), seeded from the plan's seed. With a
  validation split, the weights of the epoch with the best pooled validation Dice are kept
  (checked every ``eval_every`` epochs).
- Evaluation: :func:`unicon_model.metrics.segmentation.mean_dice` (foreground Dice, MONAI
  ``compute_dice`` with empty targets ignored), the function the sites use for UNICON's R,
  computed over the pooled test cases (and per site for ``R_per_site``).

The images leave the sites in this baseline; it is a reference, not a federated method.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, RandFlipd
from torch import Tensor, nn

from client.data import CaseDataset, build_dataset, label_key
from client.manifest import load_manifest
from client.site_folder import check_unique_sites, manifest_in
from simulations.report import MethodResult, method_result
from unicon_model.metrics.segmentation import mean_dice
from unicon_model.schema import ModalitySpec, Plan, TaskSpec, validate_plan

logger = logging.getLogger(__name__)

UNET_EPOCHS = 60
"""Default epochs of the reference U-Net (DiceCE, Adam 1e-3, flips: converged on the
default scenario)."""


class UNetBaselineError(ValueError):
    """The U-Net baseline cannot run on this plan or these sites (the message says why)."""


@dataclass(frozen=True)
class UNetSettings:
    """Training settings of the reference U-Net.

    Attributes
    ----------
    epochs
        Passes over the pooled training cases.
    features
        ``BasicUNet`` channel widths (six numbers; small for CPU).
    lr
        Adam learning rate.
    batch_size
        Cases per step.
    flip_prob
        Probability of mirroring along each spatial axis (image and mask together).
    eval_every
        Epochs between checks of the pooled validation Dice (the best weights are kept).
    patience
        Stop after this many validation checks without a better Dice (``None``: never).
    norm_groups
        Groups of the GroupNorm layers (instance norm, BasicUNet's default, fails on the
        single-voxel bottleneck of 16³ patches); must divide every width.
    """

    epochs: int = UNET_EPOCHS
    features: tuple[int, int, int, int, int, int] = (8, 8, 16, 32, 64, 8)
    lr: float = 1e-3
    batch_size: int = 4
    flip_prob: float = 0.5
    eval_every: int = 5
    patience: int | None = 3
    norm_groups: int = 4


@dataclass(frozen=True)
class Route:
    """One segmentation route of a plan: the task, the modality, and the stage adding it."""

    task: TaskSpec
    modality: ModalitySpec
    stage: int

    @property
    def column(self) -> str:
        """The ``task@modality`` column of R."""
        return f"{self.task.name}@{self.modality.name}"


@dataclass
class Cases:
    """Images ``(N, C, *patch)`` and integer masks ``(N, *patch)`` of one split."""

    images: Tensor
    masks: Tensor
    sites: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def segmentation_routes(plan: Plan) -> list[Route]:
    """Every ``segmentation task@modality`` a stage of ``plan`` trains, in stage order."""
    routes: dict[str, Route] = {}
    for index, stage in enumerate(plan.stages):
        tasks = plan.tasks_until(index)
        modalities = plan.modalities_until(index)
        for task_name in stage.objective_tasks:
            task = tasks.get(task_name)
            if task is None or task.kind != "segmentation":
                continue
            for modality in plan.stage_modalities(index):
                route = Route(task, modalities[modality], index)
                routes.setdefault(route.column, route)
    return list(routes.values())


def _stack(datasets: Sequence[tuple[str, CaseDataset]], task: str) -> Cases:
    images: list[Tensor] = []
    masks: list[Tensor] = []
    sites: list[str] = []
    for site, dataset in datasets:
        for sample in dataset.samples:
            if not bool(sample[label_key(task, "has")]):
                continue
            images.append(sample["image"])
            masks.append(sample[label_key(task, "mask")])
            sites.append(site)
    if not images:
        return Cases(torch.empty(0), torch.empty(0, dtype=torch.long), [])
    return Cases(torch.stack(images).float(), torch.stack(masks).long(), sites)


def load_route(
    plan: Plan, route: Route, site_dirs: Sequence[Path], cache_dir: Path | None = None
) -> dict[str, Cases]:
    """The pooled ``train``, ``val`` and ``test`` cases of ``route`` over every site.

    Each site's cases are read with :func:`client.data.build_dataset` (the site's own
    preprocessing); a site without the route's images contributes nothing.
    """
    names = check_unique_sites(site_dirs)
    manifests = {names[Path(d)]: load_manifest(manifest_in(Path(d))) for d in site_dirs}
    out: dict[str, Cases] = {}
    for split in ("train", "val", "test"):
        datasets = [
            (
                site,
                build_dataset(
                    manifest,
                    split=split,
                    modality=route.modality,
                    tasks={route.task.name: route.task},
                    data=plan.data,
                    cache_dir=cache_dir,
                ),
            )
            for site, manifest in manifests.items()
        ]
        out[split] = _stack(datasets, route.task.name)
    return out


def _flips(spatial_dims: int, prob: float) -> Compose:
    return Compose(
        [
            RandFlipd(keys=["image", "mask"], prob=prob, spatial_axis=axis)
            for axis in range(spatial_dims)
        ]
    )


def _plain(value: Any) -> Tensor:
    tensor = torch.as_tensor(value)
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def predict_labels(model: nn.Module, images: Tensor, *, batch_size: int = 8) -> Tensor:
    """Integer label maps ``(N, *patch)``: the argmax over the network's output channels."""
    model.eval()
    outputs: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            outputs.append(logits.argmax(dim=1))
    if not outputs:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(outputs)


def score(model: nn.Module, cases: Cases, *, num_labels: int) -> float:
    """Foreground Dice of ``model`` on ``cases`` (the sites' metric function); NaN if none."""
    if len(cases) == 0:
        return math.nan
    return mean_dice(predict_labels(model, cases.images), cases.masks, num_labels=num_labels)


def train_unet(
    train: Cases,
    *,
    num_labels: int,
    spatial_dims: int,
    settings: UNetSettings = UNetSettings(),
    val: Cases | None = None,
    seed: int = 0,
) -> nn.Module:
    """Train a MONAI ``BasicUNet`` on ``train`` (DiceCE, Adam, flips), seeded.

    Parameters
    ----------
    train
        Training images ``(N, C, *patch)`` and masks ``(N, *patch)``.
    num_labels
        Output channels (labels including background).
    spatial_dims
        2 or 3.
    settings
        Epochs, widths, learning rate, batch size, flips, validation interval.
    val
        Validation cases; when given, the weights with the best validation Dice are returned.
    seed
        Seeds initialisation, shuffling and flips (the global random state is left as is).

    Raises
    ------
    UNetBaselineError
        If there are no training cases.
    """
    if len(train) == 0:
        raise UNetBaselineError("no training case has the route's images and a mask")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=int(train.images.shape[1]),
            out_channels=num_labels,
            features=settings.features,
            norm=("group", {"num_groups": settings.norm_groups}),
        )
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        flips = _flips(spatial_dims, settings.flip_prob)
        flips.set_random_state(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        best: tuple[float, dict[str, Tensor]] | None = None
        stale = 0
        for epoch in range(1, settings.epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            losses: list[float] = []
            for start in range(0, len(order), settings.batch_size):
                index = order[start : start + settings.batch_size]
                pairs = [
                    flips({"image": train.images[i], "mask": train.masks[i].unsqueeze(0)})
                    for i in index.tolist()
                ]
                images = torch.stack([_plain(p["image"]) for p in pairs])
                masks = torch.stack([_plain(p["mask"]) for p in pairs])
                optimiser.zero_grad()
                loss = loss_fn(model(images), masks)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
            check = val is not None and len(val) > 0
            if check and (epoch % settings.eval_every == 0 or epoch == settings.epochs):
                assert val is not None
                dice = score(model, val, num_labels=num_labels)
                logger.info("unet epoch %d: loss %.4f, val Dice %.4f", epoch, np.mean(losses), dice)
                if math.isfinite(dice) and (best is None or dice > best[0]):
                    best = (dice, copy.deepcopy(model.state_dict()))
                    stale = 0
                else:
                    stale += 1
                if settings.patience is not None and stale >= settings.patience:
                    logger.info("unet: no better val Dice in %d check(s); stopping", stale)
                    break
        if best is not None:
            model.load_state_dict(best[1])
    model.eval()
    return model


def _per_site(model: nn.Module, cases: Cases, *, num_labels: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for site in sorted(set(cases.sites)):
        keep = torch.tensor([s == site for s in cases.sites])
        subset = Cases(cases.images[keep], cases.masks[keep], [site] * int(keep.sum()))
        out[site] = score(model, subset, num_labels=num_labels)
    return out


def run_unet(
    raw: Mapping[str, Any],
    site_dirs: Sequence[Path],
    work: Path,
    wall: Callable[[], float],
    settings: UNetSettings | None = None,
) -> MethodResult:
    """The reference U-Net of every segmentation route of the plan, as a method's result.

    R[stage, column] holds the route's pooled test Dice from the stage that adds the route
    on (each network is separate, so nothing is forgotten); other tasks have no column.
    ``bytes_up`` is 0 per site: no model travels (the images are pooled instead).

    Raises
    ------
    UNetBaselineError
        If the plan has no segmentation route, or no site has training cases for any.
    """
    plan = validate_plan(raw)
    settings = settings or UNetSettings()
    routes = segmentation_routes(plan)
    if not routes:
        raise UNetBaselineError(
            f"plan {plan.name!r} trains no segmentation task: the unet baseline has nothing "
            "to compare"
        )
    stages = plan.stage_names
    pooled: dict[str, float] = {}
    per_site: dict[str, dict[str, float]] = {}
    introduced: dict[str, int] = {}
    rounds: list[dict[str, Any]] = []
    names = check_unique_sites(site_dirs)
    for route in routes:
        started = time.perf_counter()
        cases = load_route(plan, route, site_dirs, cache_dir=work / "unet" / "cache")
        if len(cases["train"]) == 0:
            logger.warning("unet baseline: no training case for %s; skipped", route.column)
            continue
        model = train_unet(
            cases["train"],
            num_labels=route.task.num_outputs,
            spatial_dims=plan.model.spatial_dims,
            settings=settings,
            val=cases["val"],
            seed=plan.model.seed,
        )
        num_labels = route.task.num_outputs
        pooled[route.column] = score(model, cases["test"], num_labels=num_labels)
        for site, value in _per_site(model, cases["test"], num_labels=num_labels).items():
            per_site.setdefault(site, {})[route.column] = value
        introduced[route.column] = route.stage
        seconds = time.perf_counter() - started
        rounds.append(
            {
                "kind": "unet",
                "stage": stages[route.stage],
                "task": route.column,
                "train_cases": len(cases["train"]),
                "test_cases": len(cases["test"]),
                "epochs": settings.epochs,
                "dice": pooled[route.column],
                "seconds": seconds,
            }
        )
        logger.info(
            "unet baseline %s: %d train / %d test case(s), Dice %.4f in %.1f s",
            route.column,
            len(cases["train"]),
            len(cases["test"]),
            pooled[route.column],
            seconds,
        )
    if not pooled:
        raise UNetBaselineError(
            "no site has training cases with a mask for any segmentation route "
            f"({', '.join(r.column for r in routes)})"
        )
    rows, site_rows = carried_matrix(stages, introduced, pooled, per_site)
    registry_like = {
        "stages": stages,
        "R": rows,
        "R_per_site": site_rows,
        "bytes_up": dict.fromkeys(names.values(), 0),
        "bytes_down": dict.fromkeys(names.values(), 0),
        "epsilon": {},
    }
    return method_result("unet", registry_like, rounds, wall())


_Value = TypeVar("_Value")


def carried_rows(
    stages: int, introduced: Mapping[str, int], values: Mapping[str, _Value]
) -> list[dict[str, _Value]]:
    """Rows of R (or of its intervals) for separately trained models: each column's value
    from the stage that introduces it on."""
    return [
        {c: v for c, v in values.items() if c in introduced and introduced[c] <= i}
        for i in range(stages)
    ]


def carried_matrix(
    stages: Sequence[str],
    introduced: Mapping[str, int],
    pooled: Mapping[str, _Value],
    per_site: Mapping[str, Mapping[str, _Value]],
) -> tuple[list[dict[str, _Value]], dict[str, dict[str, dict[str, _Value]]]]:
    """``R`` and ``R_per_site`` (site -> stage -> row) of :func:`carried_rows`."""
    rows = carried_rows(len(stages), introduced, pooled)
    sites = {
        site: dict(zip(stages, carried_rows(len(stages), introduced, row), strict=True))
        for site, row in per_site.items()
    }
    return rows, sites
