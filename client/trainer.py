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
from client.losses import clinical_of, objective
from client.self_supervised import reconstruction_metrics
from unicon_model.components import select_state, set_trainable
from unicon_model.metrics import accuracy, concordance_index, cox_partial_likelihood_loss, roc_auc
from unicon_model.metrics.evaluation import (
    classification_extras,
    segmentation_extras,
    survival_extras,
)
from unicon_model.metrics.segmentation import dice_per_case, mean_dice_of_cases
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


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


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
    if len(dataset) == 0:
        raise TrainingError(
            f"no training cases for modality {dataset.modality!r} and tasks {sorted(tasks)}"
        )
    device = device or default_device()
    model.to(device)
    model.train()  # Opacus refuses a model in eval mode; a caller may have just evaluated it
    trainable = set(set_trainable(model, stage.trained_components))
    params = [p for n, p in model.named_parameters() if n in trainable]
    batch_size = min(stage.batch_size, len(dataset))
    sample_rate, _ = steps_for(len(dataset), batch_size, stage.local_epochs)
    if seed is None:
        generator = secret_generator()
        global_seed = secrets.randbits(63)
    else:
        generator = torch.Generator().manual_seed(seed)
        global_seed = seed
    with _seeded(global_seed):
        # the plan's random augmentation (train split only), drawn from the seeded global RNG
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
        scaler = torch.amp.GradScaler(
            "cuda", enabled=use_amp and not torch.cuda.is_bf16_supported()
        )
        model.train()
        epoch_losses: list[float] = []
        task_losses: dict[str, list[float]] = {t: [] for t in tasks}
        steps = 0
        for _epoch in range(stage.local_epochs):
            losses: list[float] = []
            for raw in loader:
                if raw["image"].shape[0] == 0:  # an empty Poisson batch still counts as a step
                    steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    continue
                batch = _to_device(raw, device)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, use_amp):
                    normaliser = batch_size if privacy is not None else None
                    loss, parts = objective(
                        net, batch, tasks, modality=dataset.modality, normaliser=normaliser
                    )
                    batch_view = {**batch, "modality": dataset.modality}
                    data_penalty = sum(
                        (
                            r.penalty(net, batch_view, loss)
                            for r in regularisers
                            if getattr(r, "data_dependent", False)
                        ),
                        start=loss.new_zeros(()),
                    )
                scaler.scale(loss + data_penalty).backward()
                # Parameter-space penalties (EWC, FedProx) depend on no data: their gradient is
                # added after DP clipping and noise, at no privacy cost.
                param_penalty = sum(
                    (
                        r.penalty(model, batch_view, loss)
                        for r in regularisers
                        if not getattr(r, "data_dependent", False)
                    ),
                    start=loss.new_zeros(()),
                )
                if privacy is not None:
                    if optimizer.pre_step():  # type: ignore[attr-defined]
                        if param_penalty.requires_grad:
                            param_penalty.backward()
                        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
                else:
                    if param_penalty.requires_grad:
                        scaler.scale(param_penalty).backward()
                    scaler.step(optimizer)
                    scaler.update()
                steps += 1
                losses.append(float(loss.detach()) + float(data_penalty.detach()))
                for name, value in parts.items():
                    task_losses[name].append(value)
            epoch_losses.append(float(np.mean(losses)) if losses else math.nan)
    if privacy is not None:
        net.to_standard_module()  # type: ignore[operator]  # remove Opacus' hooks from model
    model.zero_grad(set_to_none=True)
    update = {
        k: v.detach().cpu().clone()
        for k, v in select_state(model, stage.trained_components).items()
    }
    bad = [k for k, v in update.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(
            f"training produced NaN/Inf in {len(bad)} tensor(s) (e.g. {bad[:3]}); the update is "
            "not sent. Lower the learning rate or check the data."
        )
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
) -> tuple[np.ndarray, list[dict[str, Tensor]]]:
    """Model outputs of ``task`` on the labelled samples of ``dataset``.

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
        batch = _to_device({k: v[keep] for k, v in raw.items()}, device)
        out = model(
            batch["image"],
            modality=dataset.modality,
            task=task.name,
            clinical=clinical_of(batch, task),
        ).float()
        if task.kind == "segmentation":
            out = out.argmax(dim=1)
        outputs.append(out.cpu().numpy())
        batches.append({k: v.cpu() for k, v in batch.items()})
    if not outputs:
        return np.zeros((0,)), []
    return np.concatenate(outputs), batches


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
        mean over foreground labels); ``<task>/psnr``, ``<task>/mse`` (reconstruction, see
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
        name = task.name
        metrics[f"{name}/n"] = float(len(outputs))
        if task.kind == "classification":
            target = torch.cat([b[label_key(name, "label")] for b in batches]).numpy()
            probs = torch.softmax(torch.from_numpy(outputs), dim=1).numpy()
            metrics[f"{name}/accuracy"] = accuracy(target, probs.argmax(1))
            scores = probs[:, 1] if probs.shape[1] == 2 else probs
            metrics[f"{name}/auc"] = roc_auc(target, scores)
            route = f"{name}@{dataset.modality}"
            metrics.update(_prefixed(name, classification_extras(route, target, probs)))
        elif task.kind == "survival":
            time = torch.cat([b[label_key(name, "time")] for b in batches])
            event = torch.cat([b[label_key(name, "event")] for b in batches])
            risk = torch.from_numpy(outputs)
            try:
                metrics[f"{name}/cindex"] = concordance_index(time.numpy(), outputs, event.numpy())
            except ValueError:
                metrics[f"{name}/cindex"] = math.nan
            metrics[f"{name}/cox_loss"] = float(cox_partial_likelihood_loss(risk, time, event))
            route = f"{name}@{dataset.modality}"
            extras = survival_extras(route, time.numpy(), outputs, event.numpy())
            metrics.update(_prefixed(name, extras))
        else:
            target_mask = torch.cat([b[label_key(name, "mask")] for b in batches])
            per_case = dice_per_case(
                torch.from_numpy(outputs), target_mask, num_labels=task.num_outputs
            )
            metrics[f"{name}/dice"] = mean_dice_of_cases(per_case)
            route = f"{name}@{dataset.modality}"
            metrics.update(_prefixed(name, segmentation_extras(route, per_case.numpy())))
    return metrics


def _prefixed(task: str, values: Mapping[str, float]) -> dict[str, float]:
    """``values`` keyed ``<task>/<metric>`` (the bootstrap, fairness and calibration extras)."""
    return {f"{task}/{metric}": float(value) for metric, value in values.items()}


def primary_metric(metrics: Mapping[str, float], task: TaskSpec) -> float:
    """The metric of ``task`` that enters R[stage, task] (NaN if not evaluated)."""
    return float(metrics.get(f"{task.name}/{PRIMARY_METRIC[task.kind]}", math.nan))
