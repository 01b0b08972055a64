"""Box prompts in local training (label box, jittered, dropped) and in evaluation (both Dice)."""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from client.data import CaseDataset, label_key
from client.trainer import DPSettings, evaluate, train
from unicon_model.model import UniconModel
from unicon_model.prompts import label_boxes, label_prompt
from unicon_model.schema import ModalitySpec, ModelSpec, OptimizerSpec, StageSpec, TaskSpec

SEG = TaskSpec(
    name="seg",
    kind="segmentation",
    labels=("bg", "lesion"),
    prompt="box",
    prompt_jitter=0.3,
    prompt_drop=0.25,
    foreground_prior=0.3,
)
STAGE = StageSpec(
    name="s",
    add_modalities=(ModalitySpec(name="ct"),),
    add_tasks=(SEG,),
    train=("backbone", "modality/ct", "task/seg"),
    local_epochs=3,
    batch_size=4,
    optimizer=OptimizerSpec(name="sgd", lr=0.01),
)


def model_of() -> UniconModel:
    model = UniconModel(ModelSpec(spatial_dims=2, widths=(4, 8), adapter_rank=1, head_hidden=4))
    model.grow(STAGE)
    return model


def cases(n: int = 8) -> CaseDataset:
    """2D 16×16 cases, each a bright rectangle of its own size labelled as the lesion; the
    image's corner voxel holds the case index (so a forward call can tell which case it is)."""
    samples = []
    for i in range(n):
        mask = torch.zeros(16, 16, dtype=torch.long)
        if i != n - 1:  # the last case has no foreground
            mask[2 + i % 4 : 6 + i, 3 : 9 + i % 5] = 1
        image = 0.2 + 0.6 * mask.float()[None] + 0.05 * torch.randn(1, 16, 16)
        image[0, 0, 0] = float(i)
        samples.append(
            {
                "image": image,
                label_key("seg", "mask"): mask,
                label_key("seg", "has"): torch.tensor(True),
            }
        )
    return CaseDataset(samples, modality="ct", case_ids=[f"c{i}" for i in range(n)])


def recorded_prompts(data: CaseDataset, seed: int, **kwargs: Any) -> list[tuple[int, torch.Tensor]]:
    """(case index, box mask) of every training sample the model saw."""
    model = model_of()
    seen: list[tuple[int, torch.Tensor]] = []
    forward = model.forward

    def recording(x: torch.Tensor, **route: Any) -> torch.Tensor:
        prompt = route.get("prompt")
        assert prompt is not None and prompt.shape == (x.shape[0], 1, 16, 16)
        seen.extend((round(float(x[j, 0, 0, 0])), prompt[j, 0].clone()) for j in range(len(x)))
        return forward(x, **route)

    model.forward = recording  # type: ignore[method-assign]
    train(model, STAGE, data, tasks={"seg": SEG}, seed=seed, device=torch.device("cpu"), **kwargs)
    return seen


def test_training_boxes_are_the_label_boxes_within_the_jitter_or_the_whole_image() -> None:
    data = cases()
    seen = recorded_prompts(data, seed=3)
    assert len(seen) == 3 * len(data)
    boxes, present = label_boxes(torch.stack([s[label_key("seg", "mask")] for s in data.samples]))
    whole, moved = 0, 0
    for case, prompt in seen:
        if bool(prompt.all()):
            whole += 1
            continue
        assert bool(present[case]), "a case without foreground gets the whole image"
        got, _ = label_boxes(prompt[None].long())
        label = boxes[case]
        limit = torch.floor(0.3 * (label[:, 1] - label[:, 0] + 1)).long()[:, None]
        assert bool(((got[0] - label).abs() <= limit).all()), (case, got, label)
        assert torch.equal(prompt, label_prompt(prompt[None].long())[0, 0])  # a box
        moved += int(not torch.equal(got[0], label))
    assert whole >= 3  # the empty case each epoch, and some dropped boxes
    assert moved > 0
    again = recorded_prompts(data, seed=3)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(seen, again, strict=True))


def test_dp_sgd_trains_a_prompted_task() -> None:
    result = train(
        model_of(),
        STAGE,
        cases(),
        tasks={"seg": SEG},
        privacy=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        seed=1,
        device=torch.device("cpu"),
    )
    assert result.update and all(torch.isfinite(v).all() for v in result.update.values())


def monai_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    metric(one_hot(pred[:, None], num_classes=2), one_hot(target[:, None], num_classes=2))
    aggregate = metric.aggregate()
    assert isinstance(aggregate, torch.Tensor)
    return float(aggregate)


def test_evaluation_reports_dice_without_and_with_the_label_box() -> None:
    model = model_of()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    data = cases()
    image = torch.stack([s["image"] for s in data.samples])
    target = torch.stack([s[label_key("seg", "mask")] for s in data.samples])
    head: Any = model.tasks["seg"]
    with torch.no_grad():  # move the lesion bias so that about half the voxels are lesion
        logits = model.eval()(image, modality="ct", task="seg")
        head.out.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    metrics = evaluate(model, data, tasks={"seg": SEG}, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        plain = model(image, modality="ct", task="seg").argmax(1)
        boxed = model(image, modality="ct", task="seg", prompt=label_prompt(target)).argmax(1)
    assert metrics["seg/n"] == len(data)
    assert metrics["seg/dice"] == monai_dice(plain, target)
    assert metrics["seg/dice_prompted"] == monai_dice(boxed, target)
    assert 0 < metrics["seg/dice"] != metrics["seg/dice_prompted"] > 0
    unprompted = evaluate(
        model, data, tasks={"seg": SEG.model_copy(update={"prompt": "none"})}, device=None
    )
    assert "seg/dice_prompted" not in unprompted
