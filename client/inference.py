"""Inference with an exported (or registry) model version on a hospital's own images.

:class:`Predictor` loads a checkpoint directory (hashes verified), preprocesses images with
exactly the transforms training used (the plan's patch size and spacing are stored in the
checkpoint), and returns per-task outputs:

- classification: class probabilities and the most likely class;
- survival: the Cox risk score (higher means earlier expected event);
- segmentation: the label map on the preprocessed grid, optionally written as NIfTI.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from client.data import preprocess_files
from client.errors import DataError
from unicon_model.checkpoint import load_checkpoint
from unicon_model.model import UniconModel
from unicon_model.schema import DataSpec, TaskSpec

logger = logging.getLogger(__name__)


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
        labels = out.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        entry: dict[str, Any] = {
            "voxels": {label: int((labels == i).sum()) for i, label in enumerate(spec.labels)}
        }
        if mask_out is not None:
            target = Path(mask_out)
            target = target.with_name(f"{target.name.split('.')[0]}-{spec.name}.nii.gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            spacing = self.data.spacing or (1.0,) * labels.ndim
            nib.save(nib.Nifti1Image(labels, np.diag([*spacing, 1.0])), str(target))
            entry["mask"] = str(target)
        return entry

    def predict(
        self,
        images: Mapping[str, str | Path],
        *,
        tasks: Sequence[str] | None = None,
        modality: str | None = None,
        clinical: Mapping[str, float] | None = None,
        mask_out: str | Path | None = None,
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
        """
        paths = {k: Path(v) for k, v in images.items()}
        route = self._modality_for(paths, modality)
        keys = self.modalities[route]
        arrays = preprocess_files(
            {k: paths[k] for k in keys},
            patch_size=self.data.patch_size,
            spacing=self.data.spacing,
            ct_window=self.data.ct_window,
        )
        x = torch.from_numpy(np.concatenate([arrays[k] for k in keys]))[None].to(self.device)
        wanted = list(tasks) if tasks is not None else list(self.tasks)
        unknown = [t for t in wanted if t not in self.tasks]
        if unknown:
            raise DataError(f"unknown task(s) {unknown}; this model has {sorted(self.tasks)}")
        result: dict[str, Any] = {"modality": route}
        with torch.no_grad():
            for name in wanted:
                spec = self.model.task_specs[name]
                covariates = self._covariates(spec, clinical)
                out = self.model(x, modality=route, task=name, clinical=covariates)
                result[name] = self._task_output(spec, out, mask_out)
        return result
