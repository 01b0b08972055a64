"""``unicon predict``: run an exported (or registry) model version on one case's images.

    unicon predict --model PACKAGE/model --image ct=scan.nii.gz [--image pet=pet.nii.gz]
                   [--task NAME] [--clinical age=64 --clinical stage=2]
                   [--mask-out out/seg.nii.gz]
                   [--box x0,y0,z0,x1,y1,z1 [--box-space voxel|world]]

prints one JSON object: the modality route used and, per task, what
:meth:`client.inference.Predictor.predict` returns. The ``predict.py`` of an exported
package (:mod:`server.export`) is a launcher for :func:`main` with ``--model`` set to the
package's own ``model/`` folder.

``--box`` is the box prompt of segmentation tasks with ``prompt = "box"``: inclusive
corners in voxel indices of the route's first image (``--box-space voxel``, the default) or
in world millimetres through that image's affine (``--box-space world``). A box that is
malformed, empty, reversed or outside the image, or ``--box`` for tasks that take no box, is
refused (exit 1); a prompted task without ``--box`` predicts without a box, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import typer

from client.errors import SiteError
from unicon_model.cli_output import EXIT_PROBLEMS, emit_json, error
from unicon_model.errors import UniconModelError

logger = logging.getLogger(__name__)

app = typer.Typer(add_completion=False)
"""``predict`` as a stand-alone command (what :func:`main` runs)."""


def parse_pairs(values: Sequence[str] | None, option: str) -> dict[str, str]:
    """``KEY=VALUE`` strings as a mapping (a later key replaces an earlier one).

    Parameters
    ----------
    values
        The option's values (``None`` or empty when it was not given).
    option
        The option's name, for the error message.

    Raises
    ------
    typer.BadParameter
        If a value has no ``=``, or an empty key or value.
    """
    out: dict[str, str] = {}
    for value in values or []:
        key, _, rest = value.partition("=")
        if not key or not rest:
            raise typer.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint=option)
        out[key] = rest
    return out


def parse_clinical(values: Sequence[str] | None) -> dict[str, float]:
    """``NAME=VALUE`` covariates as numbers.

    Raises
    ------
    typer.BadParameter
        If a value is not ``NAME=VALUE`` or VALUE is not a number.
    """
    clinical: dict[str, float] = {}
    for name, text in parse_pairs(values, "--clinical").items():
        try:
            clinical[name] = float(text)
        except ValueError as e:
            raise typer.BadParameter(
                f"{name}={text!r}: the value is not a number", param_hint="--clinical"
            ) from e
    return clinical


BoxOption = Annotated[
    str | None,
    typer.Option(
        "--box",
        help="Box prompt x0,y0,z0,x1,y1,z1 (inclusive corners; 2D: x0,y0,x1,y1) of "
        "segmentation tasks with prompt = 'box'.",
    ),
]
BoxSpaceOption = Annotated[
    Literal["voxel", "world"],
    typer.Option(
        "--box-space",
        help="voxel: indices of the first image of the route; world: millimetres through its "
        "affine.",
    ),
]


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="Model folder: an exported package's model/ or a registry version folder.",
        ),
    ],
    image: Annotated[
        list[str],
        typer.Option("--image", help="KEY=PATH image of the case (repeat: --image pet=...)."),
    ],
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Task name (repeat; default: all).")
    ] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Modality route (default: from the images).")
    ] = None,
    clinical: Annotated[
        list[str] | None,
        typer.Option("--clinical", help="NAME=VALUE covariate of survival tasks (repeat)."),
    ] = None,
    mask_out: Annotated[
        Path | None,
        typer.Option("--mask-out", help="Where to write segmentation label maps (NIfTI)."),
    ] = None,
    box: BoxOption = None,
    box_space: BoxSpaceOption = "voxel",
) -> None:
    """Predict with a model version on one case; print the outputs as one JSON object.

    Exit code 1 if the model folder fails verification or the images do not fit the model
    (unknown task or modality, missing covariate, unreadable image, a box that does not fit
    the image or a task that takes none); 2 for a malformed KEY=VALUE.
    """
    images = parse_pairs(image, "--image")
    covariates = parse_clinical(clinical)
    from client.inference import Predictor  # torch: import late, `unicon --help` stays fast

    try:
        predictor = Predictor(model)
        result = predictor.predict(
            images,
            tasks=list(task) if task else None,
            modality=modality,
            clinical=covariates,
            mask_out=mask_out,
            box=box,
            box_space=box_space,
        )
    except (SiteError, UniconModelError, OSError) as e:
        error(e)
        raise typer.Exit(code=EXIT_PROBLEMS) from e
    logger.debug("predicted %s with %s", sorted(result), model)
    emit_json(result)


def main(argv: Sequence[str] | None = None, prog_name: str = "predict.py") -> None:
    """Run :func:`predict` as a stand-alone command (exits with its exit code).

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``).
    prog_name
        Program name shown in usage and help.
    """
    app(args=None if argv is None else list(argv), prog_name=prog_name)
