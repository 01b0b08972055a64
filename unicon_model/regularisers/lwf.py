"""Learning without forgetting (Li & Hoiem, TPAMI 2017): distil earlier tasks from a teacher.

The teacher is a frozen copy of the global model at the start of the round. For every
earlier task the student's outputs on the current batch are pulled towards the teacher's:

- classification: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per example;
- segmentation: the same KL per voxel, averaged over voxels;
- survival: squared difference of the risk scores.

The penalty reads the batch, so under DP-SGD its gradient is clipped and noised with the
task loss (``data_dependent = True``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from unicon_model.regularisers.base import unwrap

TASK_KINDS = ("classification", "survival", "segmentation")


def distillation_loss(student: Tensor, teacher: Tensor, kind: str, temperature: float) -> Tensor:
    """Per-example distillation loss ``(B,)`` of one task's outputs.

    Parameters
    ----------
    student, teacher
        Logits ``(B, C)`` / ``(B, L, *spatial)`` or risk scores ``(B,)``.
    kind
        ``classification``, ``survival`` or ``segmentation``.
    temperature
        Softening temperature ``T`` of the class distributions.
    """
    if kind == "survival":
        return (student.float() - teacher.float()) ** 2
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    if kind == "segmentation":
        kl = kl.flatten(1).mean(dim=1)
    return kl * t * t


class LwF:
    """Distillation of earlier tasks from a frozen teacher model.

    Parameters
    ----------
    teacher
        The frozen model (see :meth:`from_model`).
    tasks
        Earlier task name -> kind.
    weight
        Strength of the penalty.
    temperature
        Softening temperature.
    """

    data_dependent = True

    def __init__(
        self, teacher: nn.Module, tasks: Mapping[str, str], weight: float, temperature: float = 2.0
    ) -> None:
        unknown = {n: k for n, k in tasks.items() if k not in TASK_KINDS}
        if unknown:
            raise ValueError(f"LwF: unknown task kinds {unknown}; expected one of {TASK_KINDS}")
        if temperature <= 0:
            raise ValueError(f"LwF temperature must be > 0, got {temperature}")
        self.teacher = teacher
        self.tasks = dict(tasks)
        self.weight = float(weight)
        self.temperature = float(temperature)

    @classmethod
    def from_model(
        cls, model: nn.Module, tasks: Mapping[str, str], weight: float, temperature: float = 2.0
    ) -> LwF:
        """LwF with a frozen deep copy of ``model`` as teacher."""
        teacher = copy.deepcopy(unwrap(model))
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return cls(teacher, tasks, weight, temperature)

    def _device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    def penalty(self, model: nn.Module, batch: Mapping[str, Any], loss: Tensor) -> Tensor:
        """Mean over the batch of the summed per-task distillation losses, times ``weight``.

        ``batch`` needs ``image`` and ``modality``; survival tasks read ``<task>:clinical``.
        """
        x = batch["image"]
        modality = batch["modality"]
        if self._device() != x.device:
            self.teacher.to(x.device)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for task, kind in self.tasks.items():
            clinical = batch.get(f"{task}:clinical")
            with torch.no_grad():
                target = self.teacher(x, modality=modality, task=task, clinical=clinical)
            output = model(x, modality=modality, task=task, clinical=clinical)
            total = total + distillation_loss(output, target, kind, self.temperature)
        return cast(Tensor, self.weight * total.mean())  # batch values are typed Any

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher's parameters and buffers."""
        return dict(self.teacher.state_dict())

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the teacher's weights."""
        self.teacher.load_state_dict(dict(state))
