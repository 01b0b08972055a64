"""The local trainer of a site: one stage's local epochs, and evaluation. No Flower here.

``train`` optimises the stage's objectives on the site's data, only through the components
the stage trains, optionally with DP-SGD (Opacus) and continual-learning regularisers, and
returns only those components. ``evaluate`` computes each task's metrics on a split.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from client.data import CaseDataset, label_key
from client.dp import make_private, steps_for
from client.errors import TrainingError
from client.losses import clinical_of
from client.self_supervised import reconstruction_metrics
from client.train_loop import StepContext, final_update, run_epochs, to_device
from unicon_model.components import set_trainable
from unicon_model.metrics import accuracy, concordance_index, cox_partial_likelihood_loss, roc_auc
from unicon_model.metrics.evaluation import (
    classification_extras,
    segmentation_extras,
    survival_extras,
)
from unicon_model.metrics.segmentation import dice_per_case, mean_dice_of_cases
from unicon_model.prompts import label_prompt
from unicon_model.regularisers import Regulariser
from unicon_model.schema import PRIMARY_METRIC, OptimizerSpec, StageSpec, TaskSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings chosen by the site for this request (noise fixed for the stage)."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainResult:
    """What a site returns after local training.

    Attributes
    ----------
    update
        State-dict entries of the stage's trained components only.
    num_examples
        Training samples used (the aggregation weight).
    steps
        Optimiser steps taken.
    sample_rate
        Batch size / examples (Poisson sampling rate under DP).
    metrics
        ``loss`` (mean over the last epoch), ``loss_first_epoch``, per-task losses.
    """

    update: dict[str, Tensor]
    num_examples: int
    steps: int
    sample_rate: float
    metrics: dict[str, float] = field(default_factory=dict)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_optimizer(spec: OptimizerSpec, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The stage's local optimiser over ``params``."""
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)


_MT_STATE_WORDS = 624
_MT_STATE_OFFSET = 24  # after the seed (u64), left (i32), seeded (i32), next (u64)


def secret_generator() -> torch.Generator:
    """A CPU generator whose whole Mersenne-Twister state is drawn from ``os.urandom``.

    ``torch.Generator.manual_seed`` keeps only the low 32 bits of the seed in the CPU
    generator's state, so a random seed alone would leave 2**32 candidates; here the 624
    state words (19 968 bits) are overwritten with operating-system randomness. The
    generator's ``initial_seed()`` is a 63-bit secret too: :func:`client.dp.make_private`
    seeds a CUDA noise generator (Philox, 64-bit seed) from it when training on a GPU.

    Returns
    -------
    torch.Generator
        Unpredictable to anyone without access to this process' memory.

    Raises
    ------
    TrainingError
        If this PyTorch's CPU generator state has an unknown layout (fail closed rather
        than train with predictable noise).
    """
    seed = secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    state = bytearray(generator.get_state().numpy().tobytes())
    expected = _MT_STATE_OFFSET + 8 * _MT_STATE_WORDS
    if len(state) < expected or struct.unpack_from("<Q", state, 0)[0] != seed:
        raise TrainingError(
            f"unknown torch CPU generator state layout ({len(state)} bytes) in torch "
            f"{torch.__version__}; cannot draw secret DP noise"
        )
    words = struct.unpack(f"<{_MT_STATE_WORDS}I", os.urandom(4 * _MT_STATE_WORDS))
    struct.pack_into(f"<{_MT_STATE_WORDS}Q", state, _MT_STATE_OFFSET, *words)
    generator.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return generator


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _batch_size(stage: StageSpec, dataset: CaseDataset) -> int:
    """The stage's batch size, at most the number of training cases."""
    return min(stage.batch_size, len(dataset))


def _prepare_model(
    model: nn.Module,
    stage: StageSpec,
    dataset: CaseDataset,
    tasks: Mapping[str, TaskSpec],
    device: torch.device | None,
) -> tuple[torch.device, list[nn.Parameter]]:
    """Put ``model`` on its device in train mode with only the stage's components trainable.

    Returns the device and the trainable parameters; raises :class:`TrainingError` for an
    empty dataset.
    """
    if len(dataset) == 0:
        raise TrainingError(
            f"no training cases for modality {dataset.modality!r} and tasks {sorted(tasks)}"
        )
    device = device or default_device()
    model.to(device)
    model.train()  # Opacus refuses a model in eval mode; a caller may have just evaluated it
    trainable = set(set_trainable(model, stage.trained_components))
    params = [p for n, p in model.named_parameters() if n in trainable]
    return device, params


def _random_sources(seed: int | None) -> tuple[torch.Generator, int]:
    """The generator of batching and DP noise, and the global torch seed, of :func:`train`."""
    if seed is None:
        generator = secret_generator()
        global_seed = secrets.randbits(63)
    else:
        generator = torch.Generator().manual_seed(seed)
        global_seed = seed
    return generator, global_seed


def _training_setup(
    model: nn.Module,
    stage: StageSpec,
    dataset: CaseDataset,
    params: Sequence[nn.Parameter],
    generator: torch.Generator,
    privacy: DPSettings | None,
    tasks: Mapping[str, TaskSpec],
    regularisers: Sequence[Regulariser],
    device: torch.device,
    amp: bool,
) -> tuple[StepContext, DataLoader[dict[str, Tensor]]]:
    """The step context and data loader of :func:`train` (DP-wrapped under ``privacy``).

    Runs under :func:`train`'s seeded global RNG, from which the plan's random augmentation
    (train split only) draws.
    """
    batch_size = _batch_size(stage, dataset)
    loader: DataLoader[dict[str, Tensor]] = DataLoader(
        dataset.augmented(),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        drop_last=False,
    )
    optimizer = build_optimizer(stage.optimizer, params)
    net: nn.Module = model
    if privacy is not None:
        net, optimizer, loader = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            generator=generator,
        )
    use_amp = amp and privacy is None and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    model.train()
    ctx = StepContext(
        model=model,
        net=net,
        optimizer=optimizer,
        scaler=scaler,
        tasks=tasks,
        regularisers=regularisers,
        private=privacy is not None,
        modality=dataset.modality,
        device=device,
        use_amp=use_amp,
        batch_size=batch_size,
        generator=generator,
    )
    return ctx, loader


def train(
    model: nn.Module,
    stage: StageSpec,
    dataset: CaseDataset,
    *,
    tasks: Mapping[str, TaskSpec],
    regularisers: Sequence[Regulariser] = (),
    privacy: DPSettings | None = None,
    device: torch.device | None = None,
    seed: int | None = None,
    amp: bool = True,
) -> TrainResult:
    """Train the stage's components on ``dataset`` for the stage's local epochs.

    Parameters
    ----------
    model
        The global model as received (grown by the stage spec, weights loaded).
    stage
        The stage: trained components, optimiser, epochs, batch size.
    dataset
        The site's training cases of the stage's modality.
    tasks
        The stage's objective tasks (name -> spec).
    regularisers
        Continual-learning penalties added to the loss (EWC, LwF, FedProx).
    privacy
        DP-SGD settings, or ``None`` for non-private training.
    device
        Where to train (default: CUDA if present, else CPU).
    seed
        Seeds batching and DP noise: equal seeds give equal updates (tests, benchmarks).
        ``None`` (the default, and what a site uses for DP-SGD) draws them from
        :func:`secret_generator`, so nobody, the coordinator included, can reproduce the
        noise; the global torch RNG is then seeded from ``os.urandom`` too.
    amp
        Automatic mixed precision on CUDA (not used with DP-SGD).

    Raises
    ------
    TrainingError
        If there is no data, or training produced NaN/Inf weights (never returned).
    """
    device, params = _prepare_model(model, stage, dataset, tasks, device)
    sample_rate, _ = steps_for(len(dataset), _batch_size(stage, dataset), stage.local_epochs)
    generator, global_seed = _random_sources(seed)
    with _seeded(global_seed):
        ctx, loader = _training_setup(
            model, stage, dataset, params, generator, privacy, tasks, regularisers, device, amp
        )
        epoch_losses, task_losses, steps = run_epochs(ctx, loader, stage.local_epochs)
    update = final_update(ctx, stage.trained_components)
    metrics = {"loss": epoch_losses[-1], "loss_first_epoch": epoch_losses[0]}
    metrics.update({f"{name}/loss": float(np.mean(v)) for name, v in task_losses.items() if v})
    return TrainResult(update, len(dataset), steps, sample_rate, metrics)


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CaseDataset,
    task: TaskSpec,
    *,
    device: torch.device | None = None,
    batch_size: int = 8,
    boxed: bool = False,
) -> tuple[np.ndarray, list[dict[str, Tensor]]]:
    """Model outputs of ``task`` on the labelled samples of ``dataset`` (``boxed``: with each
    sample's label bounding box as its prompt, see :func:`label_prompt`).

    Returns
    -------
    tuple
        Outputs stacked as a NumPy array (logits, risks or label maps) and the labelled
        samples' batches (for their targets).
    """
    device = device or default_device()
    model.to(device).eval()
    has = label_key(task.name, "has")
    outputs, batches = [], []
    loader: DataLoader[dict[str, Tensor]] = DataLoader(dataset, batch_size=batch_size)
    for raw in loader:
        keep = raw[has].bool()
        if not keep.any():
            continue
        batch = to_device({k: v[keep] for k, v in raw.items()}, device)
        extra = {"prompt": label_prompt(batch[label_key(task.name, "mask")])} if boxed else {}
        out = model(
            batch["image"],
            modality=dataset.modality,
            task=task.name,
            clinical=clinical_of(batch, task),
            **extra,
        ).float()
        if task.kind == "segmentation":
            out = out.argmax(dim=1)
        outputs.append(out.cpu().numpy())
        batches.append({k: v.cpu() for k, v in batch.items()})
    if not outputs:
        return np.zeros((0,)), []
    return np.concatenate(outputs), batches


def _classification_metrics(
    name: str, route: str, outputs: np.ndarray, batches: Sequence[Mapping[str, Tensor]]
) -> dict[str, float]:
    """Accuracy, AUC and the route's extras of a classification task, from its logits."""
    metrics: dict[str, float] = {}
    target = torch.cat([b[label_key(name, "label")] for b in batches]).numpy()
    probs = torch.softmax(torch.from_numpy(outputs), dim=1).numpy()
    metrics[f"{name}/accuracy"] = accuracy(target, probs.argmax(1))
    scores = probs[:, 1] if probs.shape[1] == 2 else probs
    metrics[f"{name}/auc"] = roc_auc(target, scores)
    metrics.update(_prefixed(name, classification_extras(route, target, probs)))
    return metrics


def _survival_metrics(
    name: str, route: str, outputs: np.ndarray, batches: Sequence[Mapping[str, Tensor]]
) -> dict[str, float]:
    """C-index (``nan`` if undefined), Cox loss and the route's extras of a survival task."""
    metrics: dict[str, float] = {}
    time = torch.cat([b[label_key(name, "time")] for b in batches])
    event = torch.cat([b[label_key(name, "event")] for b in batches])
    risk = torch.from_numpy(outputs)
    try:
        metrics[f"{name}/cindex"] = concordance_index(time.numpy(), outputs, event.numpy())
    except ValueError:
        metrics[f"{name}/cindex"] = math.nan
    metrics[f"{name}/cox_loss"] = float(cox_partial_likelihood_loss(risk, time, event))
    extras = survival_extras(route, time.numpy(), outputs, event.numpy())
    metrics.update(_prefixed(name, extras))
    return metrics


def _segmentation_metrics(
    task: TaskSpec,
    route: str,
    outputs: np.ndarray,
    batches: Sequence[Mapping[str, Tensor]],
    boxed: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean Dice, the route's extras and ``dice_prompted`` (from ``boxed``) of a segmentation."""
    target = torch.cat([b[label_key(task.name, "mask")] for b in batches])
    per_case = dice_per_case(torch.from_numpy(outputs), target, num_labels=task.num_outputs)
    metrics = {f"{task.name}/dice": mean_dice_of_cases(per_case)}
    metrics.update(_prefixed(task.name, segmentation_extras(route, per_case.numpy())))
    if boxed is not None:  # `dice` (no prompt) stays the primary metric
        boxed_cases = dice_per_case(torch.from_numpy(boxed), target, num_labels=task.num_outputs)
        metrics[f"{task.name}/dice_prompted"] = mean_dice_of_cases(boxed_cases)
    return metrics


def evaluate(
    model: nn.Module,
    dataset: CaseDataset,
    *,
    tasks: Mapping[str, TaskSpec],
    device: torch.device | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Metrics of every task on ``dataset``.

    Returns
    -------
    dict
        ``<task>/n`` and, by kind: ``<task>/accuracy``, ``<task>/auc`` (classification);
        ``<task>/cindex``, ``<task>/cox_loss`` (survival); ``<task>/dice`` (segmentation,
        no prompt; a prompted task adds ``dice_prompted``, with each label's bounding box as
        its box); ``<task>/psnr``, ``<task>/mse`` (reconstruction, see
        :func:`client.self_supervised.reconstruction_metrics`). Tasks without labelled
        samples are left out. Classification, survival and segmentation add the bootstrap
        interval of their primary metric and their calibration and fairness figures
        (:mod:`unicon_model.metrics.evaluation`), all aggregates of this site's cases.
    """
    metrics: dict[str, float] = {}
    for task in tasks.values():
        if task.kind == "reconstruction":
            metrics.update(
                reconstruction_metrics(
                    model,
                    dataset,
                    task,
                    modality=dataset.modality,
                    device=device or default_device(),
                    batch_size=batch_size,
                )
            )
            continue
        outputs, batches = predict(model, dataset, task, device=device, batch_size=batch_size)
        if not batches:
            continue
        metrics[f"{task.name}/n"] = float(len(outputs))
        route = f"{task.name}@{dataset.modality}"
        if task.kind == "classification":
            metrics.update(_classification_metrics(task.name, route, outputs, batches))
        elif task.kind == "survival":
            metrics.update(_survival_metrics(task.name, route, outputs, batches))
        elif not task.prompted:
            metrics.update(_segmentation_metrics(task, route, outputs, batches))
        else:  # also with each case's label box as its prompt
            boxed = predict(model, dataset, task, device=device, batch_size=batch_size, boxed=True)
            metrics.update(_segmentation_metrics(task, route, outputs, batches, boxed[0]))
    return metrics


def _prefixed(task: str, values: Mapping[str, float]) -> dict[str, float]:
    """``values`` keyed ``<task>/<metric>`` (the bootstrap, fairness and calibration extras)."""
    return {f"{task}/{metric}": float(value) for metric, value in values.items()}


def primary_metric(metrics: Mapping[str, float], task: TaskSpec) -> float:
    """The metric of ``task`` that enters R[stage, task] (NaN if not evaluated)."""
    return float(metrics.get(f"{task.name}/{PRIMARY_METRIC[task.kind]}", math.nan))
