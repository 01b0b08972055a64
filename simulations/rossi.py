"""Lifelines' ``rossi`` recidivism data as non-IID site folders whose images carry no signal.

``rossi`` (Rossi, Berk & Lenihan 1980; 432 released prisoners followed for 52 weeks, 114
re-arrests) ships with lifelines as a CSV, so it loads offline. Each case becomes a site
case with the seven covariates (``fin age race wexp mar paro prio``) as clinical values, the
survival label ``{time: week, event: arrest}`` and a small image of pure noise (``.npy``,
seeded per case): a survival task whose images say nothing, so the federated model can only
be as good as a Cox regression on the covariates (issue 11, item 7).

Sites are non-IID: the cases are sorted by a covariate (``age`` by default) and cut into
quantiles, one per site, so each hospital sees a different age band. Within each site a
fixed fraction is held out as ``test``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

logger = logging.getLogger(__name__)

COVARIATES: tuple[str, ...] = ("fin", "age", "race", "wexp", "mar", "paro", "prio")
"""The rossi covariates, in the order the survival head sees them."""
DURATION = "week"
EVENT = "arrest"
TASK = "recidivism"
IMAGE_KEY = "scan"
"""Image key of the noise volumes (not ``ct``/``pet``: percentile intensity scaling, so the
noise stays noise after preprocessing)."""


def load_rossi() -> Any:
    """The rossi data frame shipped with lifelines (no download).

    Raises
    ------
    RuntimeError
        If lifelines (a dev dependency) is not installed.
    """
    try:
        from lifelines.datasets import load_rossi as _load
    except ImportError as e:  # pragma: no cover - lifelines is a dev dependency
        raise RuntimeError(
            "the rossi sites need lifelines (pip install lifelines); it ships the data"
        ) from e
    return _load()


def covariate_scaling(frame: Any) -> dict[str, list[float]]:
    """``{covariate: [mean, std]}`` of the whole data set, for the plan's scaling.

    These are public summary statistics of the published data set, fixed by the plan so
    every site feeds the head the same units.
    """
    return {
        name: [round(float(frame[name].mean()), 3), round(float(frame[name].std()), 3)]
        for name in COVARIATES
    }


def site_assignment(frame: Any, *, sites: int, by: str) -> np.ndarray:
    """Site index of every row: quantiles of ``by`` (ties broken by row order)."""
    if by not in frame.columns:
        raise ValueError(f"cannot split by {by!r}: rossi has {list(frame.columns)}")
    if not 1 <= sites <= len(frame):
        raise ValueError(f"sites must be in 1..{len(frame)}, got {sites}")
    order = np.argsort(frame[by].to_numpy(), kind="stable")
    assignment = np.empty(len(frame), dtype=np.int64)
    for index, chunk in enumerate(np.array_split(order, sites)):
        assignment[chunk] = index
    return assignment


def held_out_rows(assignment: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out rows: ``test_fraction`` of each site, drawn at random."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(assignment), dtype=bool)
    for site in np.unique(assignment):
        rows = np.flatnonzero(assignment == site)
        rng.shuffle(rows)
        test[rows[: max(1, round(len(rows) * test_fraction))]] = True
    return test


def write_rossi_sites(
    out: str | Path,
    *,
    sites: int = 4,
    by: str = "age",
    test_fraction: float = 0.25,
    seed: int = 0,
    size: int = 8,
    spatial_dims: int = 3,
    images: Literal["constant", "noise"] = "constant",
) -> list[Path]:
    """Write rossi as ``sites`` site folders under ``out``; return the folders.

    Parameters
    ----------
    out
        Parent folder; site ``i`` goes to ``out/rossi-<letter>``.
    sites
        Number of sites (quantiles of ``by``).
    by
        Column whose quantiles define the sites (non-IID split).
    test_fraction
        Share of each site held out as ``test``; the rest is ``train``.
    seed
        Seeds the test draw and the noise images.
    size
        Edge of the noise images (voxels).
    spatial_dims
        2 or 3.
    images
        ``constant``: every case has the same image (no signal at all, so the image term of
        the risk is one constant offset); ``noise``: independent Gaussian noise per case (no
        signal either, but a model can overfit it).

    Returns
    -------
    list of Path
        The site folders, each with ``manifest.yaml`` and ``images/<case>.npy``.
    """
    frame = load_rossi()
    assignment = site_assignment(frame, sites=sites, by=by)
    test = held_out_rows(assignment, test_fraction=test_fraction, seed=seed)
    if images not in ("constant", "noise"):
        raise ValueError(f"images must be 'constant' or 'noise', got {images!r}")
    rng = np.random.default_rng([seed, 1])
    shape = (size,) * spatial_dims
    constant = np.random.default_rng([seed, 2]).normal(size=shape).astype(np.float32)
    folders = []
    for site in range(sites):
        folder = Path(out) / f"rossi-{chr(ord('a') + site)}"
        rows = np.flatnonzero(assignment == site)
        noises = (rng.normal(size=shape).astype(np.float32) for _ in rows)
        volumes = [constant if images == "constant" else noise for noise in noises]
        _write_rossi_site(folder, frame, rows, test, volumes)
        folders.append(folder)
    logger.info("wrote %d rossi site(s) split by %s under %s", sites, by, out)
    return folders


def _write_rossi_site(
    folder: Path, frame: Any, rows: np.ndarray, test: np.ndarray, volumes: Sequence[np.ndarray]
) -> None:
    """Write one rossi site folder: the ``rows`` of ``frame``, each with its image volume."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cases: list[dict[str, Any]] = []
    for row, volume in zip(rows, volumes, strict=True):
        case_id = f"case-{row:03d}"
        image = f"images/{case_id}.npy"
        np.save(folder / image, volume, allow_pickle=False)
        record = frame.iloc[row]
        cases.append(
            {
                "id": case_id,
                "split": "test" if test[row] else "train",
                "images": {IMAGE_KEY: image},
                "clinical": {c: float(record[c]) for c in COVARIATES},
                "labels": {TASK: {"time": float(record[DURATION]), "event": int(record[EVENT])}},
            }
        )
    manifest = {"site": folder.name, "tasks": {TASK: {"kind": "survival"}}, "cases": cases}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def rossi_plan(
    *,
    rounds: int = 40,
    local_epochs: int = 1,
    lr: float = 4.0,
    size: int = 8,
    widths: Sequence[int] = (4, 8),
) -> dict[str, Any]:
    """A one-stage plan: a survival head on the rossi covariates over a frozen encoder.

    The batch holds a site's whole training split (``batch_size`` 4096), so the Cox loss is
    the site's exact partial likelihood per case. With one plain SGD step per round
    (FedSGD) the case-weighted average of the sites' steps is a gradient step on the pooled
    site-stratified partial likelihood, so the head converges to that Cox model's estimate
    (Adam's per-round reset, momentum or several local steps would stop short of it or
    drift towards each site's own optimum). ``lr`` 4 suits covariates scaled to unit
    variance; 6 diverges on rossi.
    """
    frame = load_rossi()
    return {
        "name": "rossi",
        "model": {
            "spatial_dims": 3,
            "widths": list(widths),
            "adapter_rank": 1,
            "head_hidden": 4,
        },
        "data": {"patch_size": [size, size, size]},
        "stages": [
            {
                "name": "prognosis",
                "add_modalities": [{"name": IMAGE_KEY}],
                "add_tasks": [
                    {
                        "name": TASK,
                        "kind": "survival",
                        "covariates": list(COVARIATES),
                        "covariate_scaling": covariate_scaling(frame),
                    }
                ],
                "train": [f"task/{TASK}"],
                "rounds": rounds,
                "local_epochs": local_epochs,
                "batch_size": 4096,
                "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.0},
                "min_sites": 1,
            }
        ],
    }
