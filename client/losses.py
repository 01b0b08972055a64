"""Task losses on a batch of a :class:`client.data.CaseDataset`.

Every loss is computed per sample (a vector over the batch, zero where the sample has no
label for the task), so it works with Opacus' per-sample clipping and with EWC's per-sample
Fisher. The Cox loss is the exception: its risk sets couple the samples of a batch, so its
per-sample vector holds each event's term within the batch's risk sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812
from monai.losses import DiceLoss
from torch import Tensor, nn

from client.data import label_key
from client.self_supervised import reconstruction_per_sample
from unicon_model.schema import TaskSpec

_DICE = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, reduction="none")


def clinical_of(batch: Mapping[str, Tensor], task: TaskSpec) -> Tensor | None:
    """The clinical covariates a survival head needs, or ``None``."""
    if task.kind != "survival" or not task.covariates:
        return None
    return batch[label_key(task.name, "clinical")]


def cox_per_sample(risk: Tensor, time: Tensor, event: Tensor, labelled: Tensor) -> Tensor:
    """Per-event negative log partial likelihood terms (Efron ties) within the batch.

    With ``R(t)`` the labelled samples still at risk at ``t`` (``t_j >= t``) and ``D(t)`` the
    ``d`` labelled events at ``t``, the ``l``-th event of ``D(t)`` (``l = 0..d-1``, in batch
    order) contributes ``-(r_i - log(sum_{R(t)} exp r - (l / d) sum_{D(t)} exp r))``, so the
    terms of a tied time sum to Efron's approximation, the one ``lifelines.CoxPHFitter``
    maximises (Breslow's, ``l = 0`` for all, biases the coefficients towards 0 when many
    events tie). Unlabelled samples and censored ones get 0.

    Parameters
    ----------
    risk
        Risk scores ``(B,)`` (log hazard ratios).
    time, event
        Times ``(B,)`` and event indicators ``(B,)`` (1 observed, 0 censored).
    labelled
        ``(B,)`` mask of the samples labelled for the task (others are in no risk set).

    Returns
    -------
    Tensor
        ``(B,)``; its sum is the batch's negative log partial likelihood, and divided by the
        number of events it is the usual Cox loss. The risk sets are the batch's, so a batch
        holding a site's whole training split gives the site's exact partial likelihood;
        small batches give a noisy, biased ranking loss instead.
    """
    risk = risk.float()
    n = len(risk)
    eye = torch.eye(n, dtype=torch.bool, device=risk.device)
    is_event = (event > 0) & labelled
    at_risk = (time.unsqueeze(0) >= time.unsqueeze(1)) & labelled.unsqueeze(0)
    tied = (time.unsqueeze(0) == time.unsqueeze(1)) & is_event.unsqueeze(0)
    # every row keeps its own sample, so no row is all -inf (which would make NaN gradients)
    log_at_risk = torch.logsumexp(risk.unsqueeze(0).masked_fill(~(at_risk | eye), -math.inf), 1)
    log_tied = torch.logsumexp(risk.unsqueeze(0).masked_fill(~(tied | eye), -math.inf), 1)
    ties = tied.sum(1).clamp(min=1).to(risk.dtype)
    rank = (tied & torch.ones_like(eye).tril(-1)).sum(1).to(risk.dtype)  # earlier tied events
    # l / d <= (d - 1) / d for an event; 0 elsewhere, so no masked row reaches log1p(-1)
    fraction = torch.where(is_event, rank / ties, torch.zeros_like(ties))
    # log(S_R - f S_D) = log S_R + log1p(-f S_D / S_R), with S_D <= S_R
    share = torch.exp(log_tied - log_at_risk).clamp(max=1.0)
    log_denominator = log_at_risk + torch.log1p(-fraction * share)
    terms = -(risk - log_denominator)
    return torch.where(is_event, terms, torch.zeros_like(terms))


def per_sample_loss(
    model: nn.Module, batch: Mapping[str, Tensor], task: TaskSpec, *, modality: str
) -> tuple[Tensor, Tensor]:
    """Loss of ``task`` for each sample of the batch.

    Returns
    -------
    tuple of Tensor
        ``(losses, counted)``: losses ``(B,)`` (0 for unlabelled samples) and a boolean
        ``(B,)`` mask of the samples that count (the labelled ones; for survival, censored
        cases count with a 0 term, so the mean is the negative log partial likelihood per
        case, not per event; for reconstruction, every sample counts).
    """
    if task.kind == "reconstruction":
        return reconstruction_per_sample(model, batch, task, modality=modality)
    prompt = label_key(task.name, "prompt")  # a prompted task's training box, if any
    extra = {"prompt": batch[prompt]} if prompt in batch else {}
    output = model(
        batch["image"],
        modality=modality,
        task=task.name,
        clinical=clinical_of(batch, task),
        **extra,
    )
    labelled = batch[label_key(task.name, "has")].bool()
    if task.kind == "classification":
        target = batch[label_key(task.name, "label")].clamp(min=0)
        losses = F.cross_entropy(output.float(), target, reduction="none")
        counted = labelled
    elif task.kind == "survival":
        time = batch[label_key(task.name, "time")]
        event = batch[label_key(task.name, "event")]
        losses = cox_per_sample(output, time, event, labelled)
        # every labelled case counts, censored ones with a 0 term: the mean is then the
        # partial likelihood per case, and FedAvg's case weights make the federated gradient
        # the pooled (site-stratified) partial likelihood's, each event weighing the same
        counted = labelled
    else:
        mask = batch[label_key(task.name, "mask")].unsqueeze(1)
        logits = output.float()
        spatial = tuple(range(1, logits.ndim - 1))
        cross_entropy = F.cross_entropy(logits, mask.squeeze(1), reduction="none").mean(spatial)
        dice = _DICE(logits, mask).flatten(1).mean(1)
        losses = cross_entropy + dice
        counted = labelled
    return torch.where(counted, losses, torch.zeros_like(losses)), counted


def objective(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    tasks: Mapping[str, TaskSpec],
    *,
    modality: str,
    normaliser: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Summed task losses of a batch.

    Parameters
    ----------
    normaliser
        Divide each task's summed per-sample losses by this (the expected batch size under
        DP-SGD, so every sample's weight is fixed); ``None`` divides by the number of
        samples that count for the task.

    Returns
    -------
    tuple
        The scalar loss and the mean loss of each task (for metrics).
    """
    total = batch["image"].new_zeros(())
    parts: dict[str, float] = {}
    for task in tasks.values():
        losses, counted = per_sample_loss(model, batch, task, modality=modality)
        n = int(counted.sum())
        denominator = normaliser if normaliser is not None else max(n, 1)
        total = total + losses.sum() / denominator
        if n:
            parts[task.name] = float(losses.detach().sum()) / n
    return total, parts
