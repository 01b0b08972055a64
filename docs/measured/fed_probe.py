"""FedAvg vs centralised training of the lesion-seg decoder on one frozen encoder (issue 11).

Loads a registry version (e.g. the default run's ``v0003-prognosis``), adds the default
plan's segmentation task and trains it over the site folders round by round: each site
trains a copy with the trainer itself (``--epochs`` local epochs, ``--batch``), the server
averages the copies weighted by cases (``--server avg``, optionally scaled by
``--server-lr``; ``momentum``: FedAvgM with ``--beta``; ``adam``: FedAdam). ``--central``
pools every site's training cases into one. Prints the pooled val and test Dice per round
and one JSON line. Run from the repository root (about 3-5 min per run, one thread):

    .venv/bin/unicon simulate make-data --out /tmp/def2/sites --sites 4 --size 32 \\
        --cases 40 --pet-sites 2 --unlabelled 10 --extra-test 40
    # a registry of the default plan on those sites (in process), then e.g.
    OMP_NUM_THREADS=1 .venv/bin/python docs/measured/fed_probe.py --sites /tmp/def2/sites \\
        --registry DIR/registry --batch 2 --rounds 8

Figures of 2026-12-03 (README, "Stage budgets and a larger test split").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.data import CaseDataset, build_dataset
from client.manifest import load_manifest
from client.site_folder import manifest_in
from client.trainer import evaluate, train
from server.registry import Registry
from unicon_model.components import select_state
from unicon_model.schema import load_plan

PLAN = Path(__file__).resolve().parents[2] / "examples" / "plans" / "unicon_retrain.toml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=Path, required=True)
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--version", default="v0003-prognosis")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--cosine", action="store_true", help="cosine lr over the rounds")
    p.add_argument("--server", choices=("avg", "momentum", "adam"), default="avg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.9)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--width", type=int, default=0, help="decoder_width (0: full decoder)")
    p.add_argument("--central", action="store_true")
    a = p.parse_args()
    plan = load_plan(PLAN)
    stage = next(s for s in plan.stages if s.name == "segmentation")
    update = {"lora_rank": a.lora_rank, "decoder_width": a.width}
    task = stage.add_tasks[0].model_copy(update=update)
    model, _ = Registry(a.registry).load(a.version)
    model.add_task(task)
    comp = [f"task/{task.name}"]
    stage = stage.model_copy(
        update={"local_epochs": a.epochs, "train": comp, "batch_size": a.batch}
    )
    modality = model.modality_specs["ct"]
    tasks = {task.name: task}

    def site_data(folder: Path, split: str) -> CaseDataset:
        manifest = load_manifest(manifest_in(folder))
        return build_dataset(manifest, split=split, modality=modality, tasks=tasks, data=plan.data)

    def pool(datasets: list[CaseDataset]) -> CaseDataset:
        samples = [x for d in datasets for x in d.samples]
        ids = [str(i) for i in range(len(samples))]
        return CaseDataset(samples, modality="ct", case_ids=ids, skipped=[])

    folders = sorted(q for q in a.sites.iterdir() if q.is_dir())
    trains = [site_data(f, "train") for f in folders]
    test = pool([site_data(f, "test") for f in folders])
    val = pool([site_data(f, "val") for f in folders])
    if a.central:
        trains = [pool(trains)]
    started = time.perf_counter()
    state = {k: v.clone() for k, v in select_state(model, comp).items()}
    m1 = {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()}
    m2 = {k: torch.zeros_like(v) for k, v in m1.items()}
    history: list[tuple[float, float]] = []
    for r in range(a.rounds):
        scale = 0.5 * (1 + math.cos(math.pi * r / a.rounds)) if a.cosine else 1.0
        optimizer = stage.optimizer.model_copy(update={"lr": a.lr * scale})
        round_stage = stage.model_copy(update={"optimizer": optimizer})
        outs, counts = [], []
        for i, data in enumerate(trains):
            local = copy.deepcopy(model)
            train(local, round_stage, data, tasks=tasks, seed=1000 * r + i)
            outs.append({k: v.detach().clone() for k, v in select_state(local, comp).items()})
            counts.append(len(data))
        total = sum(counts)
        new = {}
        for k, v in state.items():
            avg = sum(o[k].float() * n for o, n in zip(outs, counts, strict=True)) / total
            if not v.is_floating_point():
                new[k] = avg.to(v.dtype)
                continue
            delta = avg - v
            if a.server == "avg":
                new[k] = v + a.server_lr * delta
            elif a.server == "momentum":
                m1[k] = a.beta * m1[k] + delta
                new[k] = v + a.server_lr * m1[k]
            else:
                m1[k] = 0.9 * m1[k] + 0.1 * delta
                m2[k] = 0.99 * m2[k] + 0.01 * delta**2
                new[k] = v + a.server_lr * m1[k] / (m2[k].sqrt() + 1e-3)
        state = new
        model.load_state_dict(state, strict=False)
        val_dice = evaluate(model, val, tasks=tasks)[f"{task.name}/dice"]
        test_dice = evaluate(model, test, tasks=tasks)[f"{task.name}/dice"]
        history.append((round(val_dice, 3), round(test_dice, 3)))
        print(r + 1, history[-1], f"{time.perf_counter() - started:.0f} s", flush=True)
    args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    print(json.dumps({"args": args, "val_test_per_round": history, "final_test": history[-1][1]}))


if __name__ == "__main__":
    main()
