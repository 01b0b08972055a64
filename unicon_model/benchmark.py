"""Speed and size of the default model: ``python -m unicon_model.benchmark``.

Prints, for each task head, the median wall time of one forward+backward pass of a batch
(default 2 x 32^3) on this machine's CPU (or GPU with ``--device cuda``), and the size of
every component. A segmentation task with rank-8 encoder deltas on every level is timed
twice side by side: with its deltas merged into the frozen weights (how it trains outside
DP-SGD) and as parallel branches (how it runs under Opacus). Timings are figures to read,
not test assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from unicon_model.components import component_sizes, set_trainable
from unicon_model.lora import ConvDelta
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, StageSpec, TaskSpec

TASKS = (
    TaskSpec(name="classification", kind="classification", classes=("benign", "malignant")),
    TaskSpec(name="survival", kind="survival", covariates=("age", "stage")),
    TaskSpec(name="segmentation", kind="segmentation", labels=("background", "tumour")),
)


def time_forward_backward(
    model: UniconModel, task: TaskSpec, *, batch: int, size: int, repeats: int, device: str
) -> float:
    """Median seconds of one forward+backward pass of ``task`` on a random batch."""
    dims = model.spec.spatial_dims
    x = torch.randn(batch, 1, *(size,) * dims, device=device)
    clinical = torch.randn(batch, len(task.covariates), device=device)
    times = []
    for _ in range(repeats + 2):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(x, modality="ct", task=task.name, clinical=clinical)
        out.float().square().mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def time_delta_forms(
    model: UniconModel, *, batch: int, size: int, repeats: int, device: str
) -> tuple[float, float]:
    """Median seconds of a forward+backward pass of a route with rank-8 encoder deltas.

    Trains only the route's own component (the deltas and the head), as a task stage of the
    low-rank plan does. Returns the times with the deltas merged and run as branches (a
    forward hook on each delta's layers, as Opacus adds, selects the branch form).
    """
    task = TaskSpec(name="segmentation-lora", kind="segmentation", labels=("bg", "fg"), lora_rank=8)
    model.grow(StageSpec(name="lora", add_tasks=(task,)))
    model.to(device)
    set_trainable(model, [f"task/{task.name}"])
    merged = time_forward_backward(
        model, task, batch=batch, size=size, repeats=repeats, device=device
    )
    hooks = [
        m.down.register_forward_hook(lambda *_: None)
        for m in model.modules()
        if isinstance(m, ConvDelta)
    ]
    branched = time_forward_backward(
        model, task, batch=batch, size=size, repeats=repeats, device=device
    )
    for hook in hooks:
        hook.remove()
    return merged, branched


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = UniconModel(ModelSpec(spatial_dims=args.spatial_dims))
    model.grow(StageSpec(name="all", add_modalities=(ModalitySpec(name="ct"),), add_tasks=TASKS))
    model.to(args.device)
    table = Table(
        title=f"forward+backward, batch {args.batch} x {args.size}^{args.spatial_dims}, "
        f"{args.device}, torch threads {torch.get_num_threads()}"
    )
    table.add_column("task head")
    table.add_column("median s", justify="right")
    for task in TASKS:
        seconds = time_forward_backward(
            model, task, batch=args.batch, size=args.size, repeats=args.repeats, device=args.device
        )
        table.add_row(task.name, f"{seconds:.3f}")
    merged, branched = time_delta_forms(
        model, batch=args.batch, size=args.size, repeats=args.repeats, device=args.device
    )
    table.add_row("segmentation, rank-8 encoder deltas merged", f"{merged:.3f}")
    table.add_row(
        "segmentation, rank-8 encoder deltas as branches (DP-SGD)",
        f"{branched:.3f} ({branched / merged:.2f} x merged)",
    )
    sizes = Table(title="component sizes")
    sizes.add_column("component")
    sizes.add_column("values", justify="right")
    sizes.add_column("bytes (fp32)", justify="right")
    for name, count in component_sizes(model).items():
        sizes.add_row(name, f"{count:,}", f"{4 * count:,}")
    console = Console()
    console.print(table)
    console.print(sizes)


if __name__ == "__main__":
    main()
