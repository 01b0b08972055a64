"""Check the site trainer's GPU paths and time them against the CPU (``make gpu-check``).

On one synthetic hospital and the default plan's model, the same stage is trained

- on the CPU in float32 (the reference),
- on CUDA in float32,
- on CUDA with automatic mixed precision in bfloat16 (what Hopper/Ampere GPUs use),
- on CUDA with float16 autocast and the gradient scaler (older GPUs),
- on CUDA with DP-SGD (Opacus),

and the script checks, for each run but DP-SGD, that the loss on the training set went down,
and for each CUDA run that every returned tensor is
finite and on the CPU, and that evaluating the same weights on CUDA and on the CPU gives the
same metrics. It prints a table (seconds per epoch, ratio to the CPU, peak GPU memory) and
writes ``gpu_check.json``. Exit status 1 when a check fails, 2 when there is no CUDA device.

It also times the trainer's local epoch against a bare PyTorch loop written here
(:func:`bare_epochs`: the same model, cases, batch size, optimiser, objective and AMP
setting, without the trainer's seeding, regularisers, DP hooks or update copy) and reports
``bare / trainer`` seconds (>= 0.9 means the trainer costs at most ~10% over the bare loop)
with the data-loading settings both use and the share of the bare epoch spent waiting for
batches (whether data loading keeps the device busy).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

from client.data import CaseDataset, build_dataset
from client.losses import objective
from client.manifest import load_manifest
from client.trainer import DPSettings, build_optimizer, evaluate, train
from simulations.synthetic import make_sites
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, load_plan

console = Console()
DEFAULT_PLAN = Path(__file__).resolve().parent.parent / "examples" / "plans" / "unicon.toml"
DATA_LOADING: dict[str, Any] = {
    "num_workers": 0,
    "pin_memory": False,
    "cached_preprocessed_tensors": True,
    "note": "cases are preprocessed once (disk cache) and held in memory as tensors; "
    "both loops use a DataLoader in the training process (no worker processes, "
    "no pinned memory) and copy each batch to the device",
}
"""The data-loading settings the trainer and the bare loop share (in the report)."""


@torch.no_grad()
def training_loss(model: torch.nn.Module, dataset: CaseDataset, tasks: Any) -> float:
    """The objective on the whole training set as one batch, on the CPU in float32."""
    model.to("cpu").eval()
    batch = {k: torch.stack([s[k] for s in dataset.samples]) for k in dataset.samples[0]}
    loss, _ = objective(model, batch, tasks, modality=dataset.modality)
    return float(loss)


@contextmanager
def _float16_autocast() -> Iterator[None]:
    """Make the trainer pick float16 + GradScaler, as on GPUs without bfloat16."""
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        yield


def _datasets(plan: Plan, out: Path, *, size: int, cases: int) -> tuple[CaseDataset, CaseDataset]:
    manifest_path = make_sites(out, sites=1, seed=3, size=size, cases_per_site=cases)[0]
    manifest = load_manifest(manifest_path)
    stage_index = len(plan.stages) - 2  # the CT segmentation stage: all three task kinds
    tasks = plan.tasks_until(stage_index)
    ct = plan.modalities_until(stage_index)["ct"]
    train_set = build_dataset(manifest, split="train", modality=ct, tasks=tasks, data=plan.data)
    test_set = build_dataset(manifest, split="test", modality=ct, tasks=tasks, data=plan.data)
    return train_set, test_set


def run_case(
    plan: Plan,
    train_set: CaseDataset,
    test_set: CaseDataset,
    *,
    device: torch.device,
    amp: bool,
    epochs: int,
    privacy: DPSettings | None = None,
) -> dict[str, Any]:
    """Train the foundation stage's components on all tasks; time it, evaluate it."""
    stage, tasks, model = _stage_and_model(plan, epochs, batch_size=8)
    loss_before = training_loss(model, train_set, tasks)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(
        model, stage, train_set, tasks=tasks, device=device, seed=0, amp=amp, privacy=privacy
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    loss_after = training_loss(model, train_set, tasks)
    on_device = evaluate(model, test_set, tasks=tasks, device=device)
    on_cpu = evaluate(model, test_set, tasks=tasks, device=torch.device("cpu"))
    finite = all(torch.isfinite(v).all() for v in result.update.values() if v.is_floating_point())
    on_host = all(v.device.type == "cpu" for v in result.update.values())
    return {
        "seconds_per_epoch": seconds / epochs,
        "training_loss_before": loss_before,
        "training_loss_after": loss_after,
        "peak_gpu_bytes": peak,
        "update_finite": bool(finite),
        "update_on_cpu": bool(on_host),
        "metrics_device": on_device,
        "metrics_cpu": on_cpu,
        "max_metric_gap": max(
            (abs(on_device[k] - on_cpu[k]) for k in on_cpu if not math.isnan(on_cpu[k])),
            default=0.0,
        ),
    }


def _stage_and_model(plan: Plan, epochs: int, batch_size: int) -> tuple[Any, Any, Any]:
    """The stage ``run_case`` trains (every task, the CT route) and a fresh model."""
    stage_index = len(plan.stages) - 2
    tasks = plan.tasks_until(stage_index)
    trained = ("backbone", "modality/ct", *(f"task/{name}" for name in tasks))
    stage = plan.stages[0].model_copy(
        update={
            "local_epochs": epochs,
            "objectives": tuple(tasks),
            "train": trained,
            "batch_size": batch_size,
        }
    )
    return stage, tasks, UniconModel.from_plan(plan, through_stage=stage_index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_epochs(
    model: torch.nn.Module,
    stage: Any,
    dataset: CaseDataset,
    *,
    tasks: Any,
    device: torch.device,
    amp: bool,
    epochs: int,
    seed: int = 0,
) -> dict[str, float]:
    """What a user would write by hand: a plain loop over a ``DataLoader``; timed.

    Same model, cases, batch size, optimiser, objective and autocast dtype as the trainer
    (bfloat16 where supported, else float16 with a gradient scaler).

    Returns
    -------
    dict
        ``seconds_per_epoch``, ``data_wait_fraction`` (time spent fetching batches and
        moving them to the device over the epoch's time) and ``loss`` (last batch).
    """
    from torch.utils.data import DataLoader

    from unicon_model.components import key_prefix

    prefixes = tuple(key_prefix(c) for c in stage.trained_components)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(stage.optimizer, params)
    loader: DataLoader[dict[str, torch.Tensor]] = DataLoader(
        dataset,
        batch_size=min(stage.batch_size, len(dataset)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    use_amp = amp and device.type == "cuda"
    bf16 = use_amp and torch.cuda.is_bf16_supported()
    dtype = (torch.bfloat16 if bf16 else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not bf16)
    waiting = 0.0
    loss = torch.zeros(())
    _sync(device)
    started = time.perf_counter()
    for _ in range(epochs):
        wait, loss = _bare_pass(
            model, loader, optimizer, scaler, tasks, dataset.modality, device, dtype
        )
        waiting += wait
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "seconds_per_epoch": seconds / epochs,
        "data_wait_fraction": waiting / seconds if seconds > 0 else 0.0,
        "loss": float(loss.detach()),
    }


def _bare_pass(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    tasks: Any,
    modality: str,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[float, torch.Tensor]:
    """One epoch of :func:`bare_epochs` (autocast to ``dtype`` unless ``None``).

    Returns the seconds spent fetching batches and moving them to the device, and the loss
    of the last batch.
    """
    waiting = 0.0
    loss = torch.zeros(())
    batches = iter(loader)
    while True:
        fetched = time.perf_counter()
        raw = next(batches, None)
        if raw is None:
            waiting += time.perf_counter() - fetched
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
        waiting += time.perf_counter() - fetched
        optimizer.zero_grad(set_to_none=True)
        if dtype is not None:
            with torch.autocast(device_type="cuda", dtype=dtype):
                loss, _ = objective(model, batch, tasks, modality=modality)
        else:
            loss, _ = objective(model, batch, tasks, modality=modality)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return waiting, loss


def trainer_vs_bare(
    plan: Plan,
    train_set: CaseDataset,
    *,
    device: torch.device,
    amp: bool,
    epochs: int,
    batch_size: int = 8,
    warmup: bool = True,
) -> dict[str, Any]:
    """Seconds per epoch of :func:`client.trainer.train` and of :func:`bare_epochs`.

    Each runs once untimed first (CUDA context, cuDNN autotuning, allocator; ``warmup``),
    then timed on a fresh copy of the same initial model. ``speed_ratio`` is bare / trainer
    seconds.
    """
    stage, tasks, initial = _stage_and_model(plan, epochs, batch_size)
    warm_stage = stage.model_copy(update={"local_epochs": 1})
    timed: dict[str, float] = {}
    bare: dict[str, float] = {}
    for warm in (True, False) if warmup else (False,):
        model = copy.deepcopy(initial)
        _sync(device)
        start = time.perf_counter()
        train(
            model,
            warm_stage if warm else stage,
            train_set,
            tasks=tasks,
            device=device,
            seed=0,
            amp=amp,
        )
        _sync(device)
        timed["trainer"] = (time.perf_counter() - start) / (1 if warm else epochs)
        bare = bare_epochs(
            copy.deepcopy(initial),
            stage,
            train_set,
            tasks=tasks,
            device=device,
            amp=amp,
            epochs=1 if warm else epochs,
        )
    return {
        "device": str(device),
        "amp": amp,
        "epochs": epochs,
        "batch_size": min(batch_size, len(train_set)),
        "cases": len(train_set),
        "trainer_seconds_per_epoch": timed["trainer"],
        "bare_seconds_per_epoch": bare["seconds_per_epoch"],
        "speed_ratio": bare["seconds_per_epoch"] / timed["trainer"],
        "bare_data_wait_fraction": bare["data_wait_fraction"],
        "data_loading": dict(DATA_LOADING),
    }


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, default=DEFAULT_PLAN)
    parser.add_argument("--size", type=int, default=64, help="voxels per side of the volumes")
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--bare-on-cpu",
        action="store_true",
        help="also time the trainer against the bare loop on the CPU (CUDA: always)",
    )
    return parser.parse_args(argv)


def _cuda_runs(
    plan: Plan, train_set: CaseDataset, test_set: CaseDataset, epochs: int
) -> dict[str, dict[str, Any]]:
    """The CUDA runs of :func:`run_case` (fp32, bf16 and fp16 autocast, DP-SGD)."""
    gpu = torch.device("cuda")
    # warm-up (CUDA context, cuDNN autotuning), not timed
    run_case(plan, train_set, test_set, device=gpu, amp=True, epochs=1)
    runs = {
        "cuda-fp32": run_case(plan, train_set, test_set, device=gpu, amp=False, epochs=epochs),
        "cuda-amp-bf16": run_case(plan, train_set, test_set, device=gpu, amp=True, epochs=epochs),
    }
    with _float16_autocast():
        runs["cuda-amp-fp16"] = run_case(
            plan, train_set, test_set, device=gpu, amp=True, epochs=epochs
        )
    runs["cuda-dp-sgd"] = run_case(
        plan,
        train_set,
        test_set,
        device=gpu,
        amp=True,
        epochs=epochs,
        privacy=DPSettings(noise_multiplier=0.8, max_grad_norm=1.0),
    )
    return runs


def _check_runs(runs: dict[str, dict[str, Any]], table: Table) -> list[str]:
    """Add each run's row to ``table`` (and its speed-up to the run); the failed checks."""
    reference = runs["cpu-fp32"]["seconds_per_epoch"]
    failures: list[str] = []
    for name, run in runs.items():
        run["speedup_vs_cpu"] = reference / run["seconds_per_epoch"]
        dp = name == "cuda-dp-sgd"
        if not dp and not run["training_loss_after"] < run["training_loss_before"]:
            failures.append(f"{name}: the loss did not go down")
        if not run["update_finite"]:
            failures.append(f"{name}: the update holds NaN/Inf")
        if not run["update_on_cpu"]:
            failures.append(f"{name}: the update was not moved to the CPU")
        if run["max_metric_gap"] > 0.02:
            failures.append(f"{name}: CUDA and CPU evaluation differ by {run['max_metric_gap']}")
        table.add_row(
            name,
            f"{run['seconds_per_epoch']:.2f}",
            f"×{run['speedup_vs_cpu']:.1f}",
            f"{run['training_loss_before']:.3f}→{run['training_loss_after']:.3f}",
            f"{run['peak_gpu_bytes'] / 2**20:.0f}",
            f"{run['max_metric_gap']:.1e}",
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print the table; write the JSON."""
    args = _arguments(argv)
    plan = load_plan(args.plan)
    plan = plan.model_copy(
        update={"data": plan.data.model_copy(update={"patch_size": (args.size,) * 3})}
    )
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        train_set, test_set = _datasets(plan, Path(tmp), size=args.size, cases=args.cases)
        console.print(f"{len(train_set)} training and {len(test_set)} test cases, {args.size}³")
        cpu = torch.device("cpu")
        runs = {
            "cpu-fp32": run_case(
                plan, train_set, test_set, device=cpu, amp=False, epochs=args.epochs
            )
        }
        if cuda:
            runs.update(_cuda_runs(plan, train_set, test_set, args.epochs))
        against_bare: dict[str, dict[str, Any]] = {}
        if args.bare_on_cpu:
            against_bare["cpu-fp32"] = trainer_vs_bare(
                plan, train_set, device=cpu, amp=False, epochs=args.epochs
            )
        if cuda:
            against_bare["cuda-amp"] = trainer_vs_bare(
                plan, train_set, device=torch.device("cuda"), amp=True, epochs=args.epochs
            )
    table = Table(title=f"Trainer on {torch.cuda.get_device_name() if cuda else 'CPU only'}")
    columns = ("run", "s/epoch", "CPU/this", "train loss before→after", "peak GPU MiB", "eval gap")
    for column in columns:
        table.add_column(column)
    failures = _check_runs(runs, table)
    console.print(table)
    for name, entry in against_bare.items():
        console.print(
            f"trainer vs bare loop, {name}: {entry['trainer_seconds_per_epoch']:.3f} vs "
            f"{entry['bare_seconds_per_epoch']:.3f} s/epoch, speed ratio (bare/trainer) "
            f"{entry['speed_ratio']:.2f} (target >= 0.9); the bare loop waited for data "
            f"{entry['bare_data_wait_fraction']:.0%} of its epoch"
        )
    report = {
        "device": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "size": args.size,
        "cases": len(train_set),
        "epochs": args.epochs,
        "runs": runs,
        "trainer_vs_bare": against_bare,
        "failures": failures,
    }
    return _finish(report, args.out, failures, cuda=cuda)


def _finish(report: dict[str, Any], out: Path, failures: list[str], *, cuda: bool) -> int:
    """Write the JSON report, print the failures; the exit status."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for failure in failures:
        console.print(f"[red]FAILED[/red] {failure}")
    if not cuda:
        console.print("no CUDA device: only the CPU reference ran")
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
