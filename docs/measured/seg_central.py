"""Train the plan's lesion-seg decoder centrally on a frozen encoder (issue 11 diagnosis).

Takes a registry version holding the encoder (e.g. the default run's ``v0003-prognosis``),
adds the plan's segmentation task, trains it on the pooled CT training cases of every site
with the trainer itself (same loss, optimiser and batching as a site) for ``--epochs``, and
prints the pooled test Dice. ``--deep``/``--width`` swap in a decoder with more convolutions
per block / wider blocks, to see what capacity buys; ``--lora-rank``/``--lora-levels`` give
the task low-rank deltas of the frozen encoder (trained with the decoder), to see what
encoder plasticity on the segmentation route buys. Run from the repository root:

    .venv/bin/unicon simulate make-data --out /tmp/def/sites --sites 4 --size 32 \\
        --cases 40 --pet-sites 2 --unlabelled 10
    .venv/bin/unicon simulate --engine inprocess --sites /tmp/def/sites --out /tmp/def/base
    .venv/bin/python docs/measured/seg_central.py --sites /tmp/def/sites \\
        --registry /tmp/def/base/work/registry --version v0003-prognosis --epochs 18
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from monai.networks.blocks import Convolution
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.data import CaseDataset, build_dataset
from client.manifest import load_manifest
from client.site_folder import manifest_in
from client.trainer import evaluate, train
from server.registry import Registry
from unicon_model.layers import ACTIVATION, conv1x1, norm_argument
from unicon_model.model import UniconModel
from unicon_model.schema import load_plan


def _wider_decoder(head: nn.Module, widths: list[int], deep: int, width: int) -> None:
    """Replace the head's blocks by ``deep`` convolutions of ``width`` x the channels."""
    blocks = nn.ModuleList()
    previous = widths[-1]
    for i in range(len(widths) - 1, 0, -1):
        out = widths[i - 1] * width
        layers = [
            Convolution(3, previous + widths[i - 1], out, kernel_size=3, act=ACTIVATION,
                        norm=norm_argument("group", out))
        ]  # fmt: skip
        norm = norm_argument("group", out)
        layers += [
            Convolution(3, out, out, kernel_size=3, act=ACTIVATION, norm=norm)
            for _ in range(deep - 1)
        ]
        blocks.append(nn.Sequential(*layers))
        previous = out
    old_out = head.get_submodule("out")
    assert isinstance(old_out, nn.Conv3d) and old_out.bias is not None
    new_out = conv1x1(3, previous, old_out.out_channels)
    with torch.no_grad():
        assert new_out.bias is not None
        new_out.bias.copy_(old_out.bias)
    head.blocks = blocks
    head.out = new_out


def main() -> None:
    """Parse the options, train, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=Path, required=True)
    parser.add_argument("--registry", type=Path)
    parser.add_argument("--version", help="registry version holding the encoder")
    parser.add_argument(
        "--fresh", action="store_true", help="a randomly initialised model, no registry"
    )
    parser.add_argument(
        "--train-encoder", action="store_true", help="train the backbone and CT adapters too"
    )
    parser.add_argument("--plan", type=Path, default=Path("examples/plans/unicon_retrain.toml"))
    parser.add_argument("--stage", default="segmentation", help="the plan stage whose task")
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0, help="training seed (and --fresh init)")
    parser.add_argument("--deep", type=int, default=1)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--lora-levels", default="", help="comma-separated; empty: all")
    args = parser.parse_args()
    plan = load_plan(args.plan)
    stage = next(s for s in plan.stages if s.name == args.stage)
    task = stage.add_tasks[0]
    if args.lora_rank:
        levels = tuple(int(v) for v in args.lora_levels.split(",") if v)
        task = task.model_copy(update={"lora_rank": args.lora_rank, "lora_levels": levels})
    if args.fresh:
        seeded = plan.model.model_copy(update={"seed": args.seed})
        model = UniconModel.from_plan(plan.model_copy(update={"model": seeded}), through_stage=0)
    else:
        if args.registry is None or args.version is None:
            parser.error("give --registry and --version, or --fresh")
        model, _ = Registry(args.registry).load(args.version)
    model.add_task(task)
    if args.deep > 1 or args.width > 1:
        _wider_decoder(model.tasks[task.name], list(model.spec.widths), args.deep, args.width)
    stage = stage.model_copy(
        update={
            "local_epochs": args.epochs,
            "optimizer": stage.optimizer.model_copy(update={"lr": args.lr}),
            "train": [f"task/{task.name}"]
            + (["backbone", "modality/ct"] if args.train_encoder else []),
        }
    )
    modality = model.modality_specs["ct"]

    def pooled(split: str) -> CaseDataset:
        samples = []
        for folder in sorted(p for p in args.sites.iterdir() if p.is_dir()):
            data = build_dataset(
                load_manifest(manifest_in(folder)), split=split, modality=modality,
                tasks={task.name: task}, data=plan.data,
            )  # fmt: skip
            samples += data.samples
        ids = [str(i) for i in range(len(samples))]
        return CaseDataset(samples, modality="ct", case_ids=ids, skipped=[])

    training, test = pooled("train"), pooled("test")
    started = time.perf_counter()
    result = train(model, stage, training, tasks={task.name: task}, seed=args.seed)
    metrics = evaluate(model, test, tasks={task.name: task})
    print(
        json.dumps(
            {
                "stage": args.stage,
                "epochs": args.epochs,
                "deep": args.deep,
                "width": args.width,
                "lora_rank": args.lora_rank,
                "lora_levels": args.lora_levels,
                "encoder": "fresh" if args.fresh else args.version,
                "train_encoder": args.train_encoder,
                "seed": args.seed,
                "train_cases": len(training),
                "test_cases": len(test),
                "loss": result.metrics,
                "test": {
                    k: v
                    for k, v in metrics.items()
                    if any(m in k for m in ("dice", "accuracy", "cindex", "auc", "/n"))
                },
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
