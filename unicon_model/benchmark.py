"""Speed and size of the default model: ``python -m unicon_model.benchmark``.

Prints, for each task head, the median wall time of one forward+backward pass of a batch
(default 2 x 32^3) on this machine's CPU (or GPU with ``--device cuda``), and the size of
every component. Timings are figures to read, not test assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from unicon_model.components import component_sizes
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
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(x, modality="ct", task=task.name, clinical=clinical)
        out.float().square().mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


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
