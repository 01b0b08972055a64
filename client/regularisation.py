"""Build a stage's continual-learning regularisers at the site, from the stage spec.

- ``fedprox``: a proximal anchor at the global model received this round.
- ``lwf``: distillation of every earlier task from a frozen copy of the received model.
- ``ewc``: the diagonal Fisher of the earlier tasks on the site's data at the model the
  stage started from, computed at the first request of the stage and kept in the site's
  state directory (safetensors), so later rounds — new processes in deployment — use the
  same Fisher and anchor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from client.component_cache import load_safetensors
from client.data import CaseDataset
from client.losses import per_sample_loss
from unicon_model.names import check_name, path_under
from unicon_model.regularisers import EWC, LwF, ProximalAnchor, Regulariser
from unicon_model.schema import Plan, StageSpec, TaskSpec

logger = logging.getLogger(__name__)


def _old_tasks(plan: Plan, stage_index: int, dataset: CaseDataset) -> dict[str, TaskSpec]:
    """Earlier tasks a regulariser protects: not the stage's objectives, and not the
    self-supervised ones (their decoders serve no route after their stage)."""
    earlier = plan.tasks_until(stage_index - 1) if stage_index > 0 else {}
    objectives = plan.stages[stage_index].objective_tasks
    return {n: t for n, t in earlier.items() if n not in objectives and not t.self_supervised}


def _ewc(
    weight: float,
    model: nn.Module,
    old: Mapping[str, TaskSpec],
    dataset: CaseDataset,
    path: Path,
) -> EWC:
    if path.exists():
        return EWC.from_state_dict(weight, load_safetensors(path))

    def loss_fn(net: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        total = None
        for task in old.values():
            losses, _ = per_sample_loss(net, batch, task, modality=dataset.modality)
            total = losses if total is None else total + losses
        assert total is not None
        return total

    ewc = EWC(weight=weight)
    labelled = [t for t in old if dataset.count_labelled(t)]
    if labelled:
        ewc.consolidate(model, DataLoader(dataset, batch_size=4), loss_fn)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ewc.state_dict().items()}, str(path))
        logger.info("EWC: Fisher of %s on %d case(s) stored in %s", labelled, len(dataset), path)
    return ewc


def build_regularisers(
    stage: StageSpec,
    model: nn.Module,
    *,
    plan: Plan,
    stage_index: int,
    dataset: CaseDataset,
    state_dir: Path,
) -> Sequence[Regulariser]:
    """Instantiate the stage's regularisers around the received global ``model``.

    Must be called after the stage's trainable components are set (``requires_grad``), since
    anchors and Fisher cover exactly the trained parameters.
    """
    built: list[Regulariser] = []
    old = _old_tasks(plan, stage_index, dataset)
    for spec in stage.regularisers:
        if spec.kind == "fedprox":
            anchor = ProximalAnchor(mu=spec.mu)
            anchor.set_anchor(model)
            built.append(anchor)
        elif spec.kind == "lwf":
            if old:
                built.append(
                    LwF.from_model(
                        model,
                        tasks={n: t.kind for n, t in old.items()},
                        weight=spec.weight,
                        temperature=spec.temperature,
                    )
                )
        else:
            name = check_name(stage.name, "stage")
            path = path_under(state_dir, f"{name}-ewc.safetensors")
            built.append(_ewc(spec.weight, model, old, dataset, path))
    return built
