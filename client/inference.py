"""Inference with an exported (or registry) model version on a hospital's own images.

:class:`Predictor` loads a checkpoint directory (hashes verified), preprocesses images with
exactly the transforms training used (the plan's patch size and spacing are stored in the
checkpoint), and returns per-task outputs:

- classification: class probabilities and the most likely class;
- survival: the Cox risk score (higher means earlier expected event);
- segmentation: the label map on the preprocessed grid, optionally written as NIfTI. A task
  with label extensions (``extends`` in a later stage) gives its merged map over every label
  (:mod:`unicon_model.label_extensions`); its extensions are not listed as tasks of their own
  unless asked for by name (each then gives its own map: background and its new labels).

A segmentation task with ``prompt = "box"`` takes a box (``box=``, inclusive corners
``x0,y0[,z0],x1,y1[,z1]``) in voxel indices of the route's first image, or in world
millimetres through that image's affine (``box_space="world"``). The box is carried through
the same geometry as the image (:func:`patch_affine`: the plan's spacing, then the centre crop
or pad to the patch) and becomes the head's box mask (:mod:`unicon_model.prompts`). Without a
box such a task falls back to its unprompted mode (the whole image), with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from client.data import preprocess_files
from client.errors import DataError
from client.images import read_image
from client.transforms import preprocessing
from unicon_model.checkpoint import load_checkpoint
from unicon_model.label_extensions import extensions_of, merged_labels, predict_label_map
from unicon_model.model import UniconModel
from unicon_model.prompts import (
    BoxError,
    box_mask,
    centres_in,
    check_box,
    check_inside,
    map_region,
    parse_box,
    region_voxels,
    voxel_region,
)
from unicon_model.schema import DataSpec, TaskSpec

logger = logging.getLogger(__name__)


BoxSpace = Literal["voxel", "world"]


def patch_affine(shape: Sequence[int], affine: np.ndarray, data: DataSpec) -> np.ndarray:
    """The voxel-to-world affine of the patch the model sees for an image of ``shape``.

    Runs the geometric part of :func:`client.transforms.preprocessing` (the plan's spacing,
    then the centre crop or pad to the patch) lazily on a stand-in of the image's shape and
    affine: MONAI records the affine each transform gives without resampling any voxel.
    """
    stand_in = torch.zeros((), dtype=torch.uint8).expand(1, *shape)
    item: dict[str, Any] = {"box": MetaTensor(stand_in, affine=torch.as_tensor(affine))}
    for transform in preprocessing(
        [], mask_keys=["box"], patch_size=data.patch_size, spacing=data.spacing
    ).transforms:
        transform.lazy = True
        item = transform(item)
    return np.asarray(item["box"].peek_pending_affine(), dtype=np.float64)


def box_in_patch(
    box: str, space: BoxSpace, image: Path, data: DataSpec
) -> tuple[np.ndarray, torch.Tensor]:
    """A user's box as an inclusive voxel box ``(D, 2)`` of the model's patch, and its mask.

    Raises
    ------
    DataError
        If the box is malformed, empty, reversed, outside the image, or cropped away by
        the preprocessing (naming the box, the axis and the image shape).
    """
    array, meta = read_image(image)
    shape = array.shape[1:]
    affine = meta.get("affine")
    if affine is None:
        affine = np.diag([*(meta.get("spacing") or (1.0,) * len(shape)), 1.0])
    shown = f"{box!r} ({space} coordinates of {image.name})"
    try:
        corners = parse_box(box, len(shape), shown=shown)
        check_box(corners, shape, shown=shown, world=space == "world")
        if space == "world":  # the image voxels whose centres the box holds
            world = map_region(corners, np.eye(len(shape) + 1), affine)
            corners = centres_in(world, shown=shown)
        region = voxel_region(corners)
        check_inside(region, shape, shown=shown)
        patch_region = map_region(region, affine, patch_affine(shape, affine, data))
        voxels = region_voxels(patch_region, data.patch_size, shown=shown)
    except BoxError as e:
        raise DataError(str(e)) from e
    mask = box_mask(
        torch.from_numpy(voxels)[None], torch.ones(1, dtype=torch.bool), data.patch_size
    )
    return voxels, mask


class Predictor:
    """A model version ready to predict on image files.

    Parameters
    ----------
    checkpoint
        A checkpoint directory (``manifest.json`` + component files).
    device
        Torch device (default: CUDA if available, else CPU).
    """

    def __init__(self, checkpoint: str | Path, device: str | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        manifest, components = load_checkpoint(self.checkpoint)
        self.manifest = manifest
        self.model = UniconModel.from_config(dict(manifest.model_config_))
        self.model.load_state_dict({k: v for c in components.values() for k, v in c.items()})
        self.data = DataSpec.model_validate(manifest.model_config_.get("data", {}))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()

    @property
    def tasks(self) -> dict[str, str]:
        """Task name -> kind, of the clinical tasks (a self-supervised task's decoder is a
        training device of its stage, not a prediction)."""
        return {n: t.kind for n, t in self.model.task_specs.items() if not t.self_supervised}

    @property
    def modalities(self) -> dict[str, list[str]]:
        """Modality name -> the image keys it reads (in channel order)."""
        return {n: list(m.input_keys) for n, m in self.model.modality_specs.items()}

    def _modality_for(self, images: Mapping[str, Path], modality: str | None) -> str:
        if modality is not None:
            if modality not in self.modalities:
                raise DataError(
                    f"unknown modality {modality!r}; this model has {sorted(self.modalities)}"
                )
            return modality
        usable = [m for m, keys in self.modalities.items() if all(k in images for k in keys)]
        if not usable:
            raise DataError(
                f"images {sorted(images)} match no modality of this model {self.modalities}"
            )
        # the route using the most inputs (e.g. PET+CT over CT alone)
        return max(usable, key=lambda m: len(self.modalities[m]))

    def _covariates(
        self, spec: TaskSpec, clinical: Mapping[str, float] | None
    ) -> torch.Tensor | None:
        """The scaled clinical covariates of a survival task that uses them, else None."""
        if spec.kind != "survival" or not spec.covariates:
            return None
        missing = [c for c in spec.covariates if c not in (clinical or {})]
        if missing:
            raise DataError(f"task {spec.name!r} needs clinical covariates {missing}")
        assert clinical is not None
        return torch.tensor([spec.scaled_covariates(clinical)], device=self.device)

    def _task_output(
        self, spec: TaskSpec, out: torch.Tensor, mask_out: str | Path | None
    ) -> dict[str, Any]:
        """One task's prediction from the model output ``out`` (a batch of one case)."""
        if spec.kind == "classification":
            probabilities = torch.softmax(out.float(), dim=1)[0].cpu().numpy()
            return {
                "probabilities": dict(zip(spec.classes, map(float, probabilities), strict=True)),
                "class": spec.classes[int(probabilities.argmax())],
            }
        if spec.kind == "survival":
            return {"risk": float(out.reshape(-1)[0])}
        return self._label_map_output(spec.name, spec.labels, out.argmax(dim=1)[0], mask_out)

    def _label_map_output(
        self,
        task: str,
        names: Sequence[str],
        label_map: torch.Tensor,
        mask_out: str | Path | None,
    ) -> dict[str, Any]:
        """A segmentation task's entry: voxels per label of ``label_map`` (one case), and its
        NIfTI file ``<stem>-<task>.nii.gz`` when ``mask_out`` is given."""
        labels = label_map.cpu().numpy().astype(np.uint8)
        entry: dict[str, Any] = {
            "voxels": {label: int((labels == i).sum()) for i, label in enumerate(names)}
        }
        if mask_out is not None:
            target = Path(mask_out)
            target = target.with_name(f"{target.name.split('.')[0]}-{task}.nii.gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            spacing = self.data.spacing or (1.0,) * labels.ndim
            nib.save(nib.Nifti1Image(labels, np.diag([*spacing, 1.0])), str(target))
            entry["mask"] = str(target)
        return entry

    def _prompts(
        self, wanted: Sequence[str], box: str | None, space: BoxSpace, image: Path
    ) -> dict[str, tuple[torch.Tensor | None, dict[str, Any]]]:
        """The prompt of each wanted task that takes one, and what to report about it.

        Raises
        ------
        DataError
            If ``box`` is given but no wanted task takes a box prompt, or the box does not
            fit the image (see :func:`box_in_patch`).
        """
        specs = {name: self.model.task_specs[name] for name in wanted}
        prompted = [name for name, spec in specs.items() if spec.prompted]
        if box is None:
            for name in prompted:
                logger.warning(
                    "task %r takes a box prompt but none was given (--box): predicting "
                    "without one (the whole image)",
                    name,
                )
            return {name: (None, {"box": None}) for name in prompted}
        if not prompted:
            raise DataError(
                f"--box given, but no task of {sorted(specs)} takes a box prompt (prompt = "
                "'box' in the plan); remove --box"
            )
        voxels, mask = box_in_patch(box, space, image, self.data)
        shown = {"box": voxels.T.reshape(-1).tolist(), "box_space": "patch voxels"}
        return {name: (mask.to(self.device), shown) for name in prompted}

    def predict(
        self,
        images: Mapping[str, str | Path],
        *,
        tasks: Sequence[str] | None = None,
        modality: str | None = None,
        clinical: Mapping[str, float] | None = None,
        mask_out: str | Path | None = None,
        box: str | None = None,
        box_space: BoxSpace = "voxel",
    ) -> dict[str, Any]:
        """Predict every requested task for one case.

        Parameters
        ----------
        images
            Image key -> file (NIfTI, DICOM file or series folder, ``.npy``).
        tasks
            Task names (default: all).
        modality
            The route to use (default: the one using the most of the given images).
        clinical
            Covariates of survival tasks that use them.
        mask_out
            Where to write segmentation label maps (``<task>`` is appended to the stem).
        box
            ``x0,y0[,z0],x1,y1[,z1]``: the box prompt of the prompted segmentation tasks
            (inclusive corners in the route's first image), reported in their entries in
            voxels of the patch. Refused when no requested task, or a task named in
            ``tasks``, takes none; without it a prompted task predicts on the whole image
            (with a warning).
        box_space
            ``voxel`` (indices of the image) or ``world`` (millimetres through its affine).
        """
        paths = {k: Path(v) for k, v in images.items()}
        route = self._modality_for(paths, modality)
        keys = self.modalities[route]
        wanted = self._wanted(tasks, box)
        prompts = self._prompts(wanted, box, box_space, paths[keys[0]])
        arrays = preprocess_files(
            {k: paths[k] for k in keys},
            patch_size=self.data.patch_size,
            spacing=self.data.spacing,
            ct_window=self.data.ct_window,
        )
        x = torch.from_numpy(np.concatenate([arrays[k] for k in keys]))[None].to(self.device)
        result: dict[str, Any] = {"modality": route}
        with torch.no_grad():
            for name in wanted:
                spec = self.model.task_specs[name]
                covariates = self._covariates(spec, clinical)
                prompt, shown = prompts.get(name, (None, {}))
                if spec.kind == "segmentation" and extensions_of(self.model.task_specs, name):
                    merged = predict_label_map(
                        self.model, x, modality=route, task=name, prompt=prompt
                    )
                    names = merged_labels(self.model.task_specs, name)
                    entry = self._label_map_output(name, names, merged[0], mask_out)
                    result[name] = {**entry, **shown}
                    continue
                out = self.model(x, modality=route, task=name, clinical=covariates, prompt=prompt)
                result[name] = {**self._task_output(spec, out, mask_out), **shown}
        return result

    def _wanted(self, tasks: Sequence[str] | None, box: str | None) -> list[str]:
        """The tasks to predict (default: all); with ``box``, each named one must take it."""
        specs = self.model.task_specs
        # an extension's labels come in its base task's merged map
        default = [t for t in self.tasks if specs[t].extends is None]
        wanted = list(tasks) if tasks is not None else default
        unknown = [t for t in wanted if t not in self.tasks]
        if unknown:
            raise DataError(f"unknown task(s) {unknown}; this model has {sorted(self.tasks)}")
        prompted = [name for name in wanted if self.model.task_specs[name].prompted]
        plain = sorted(set(wanted) - set(prompted))
        if box is not None and tasks is not None and plain:
            raise DataError(
                f"--box given for task(s) {plain}, which take no box prompt (only segmentation "
                "tasks with prompt = 'box' do); remove --box or those --task options"
            )
        return wanted
