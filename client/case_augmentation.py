"""Random augmentation of a site's training samples, on the fly after the cache.

An :class:`Augmenter` transforms one stored sample (image and segmentation masks together);
:class:`AugmentedCases` is the view of a :class:`client.data.CaseDataset` the local training
loop reads (:meth:`client.data.CaseDataset.augmented`). The stored samples never change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from torch import Tensor
from torch.utils.data import Dataset

from client.transforms import augmentation
from unicon_model.schema import AugmentationSpec

if TYPE_CHECKING:
    from client.data import CaseDataset

_SEED_BOUND = 2**32
"""Seeds of MONAI's random states are below this."""


def _plain(value: Any) -> Tensor:
    """A MONAI output as a plain tensor (no MetaTensor metadata in batches)."""
    tensor = torch.as_tensor(value)
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class Augmenter:
    """Random augmentation of one training sample (the plan's ``data.augmentation``).

    The image and every segmentation mask are transformed together (masks with nearest
    neighbours, so they keep their integer labels); every other entry (classification and
    survival labels, covariates, ``has`` flags) is passed through as is. The stored sample
    is never modified.

    Parameters
    ----------
    spec
        The plan's augmentation settings.
    spatial_dims
        2 or 3.
    mask_keys
        Sample keys of the segmentation masks (``<task>:mask``, ``(*spatial)`` int64).
    """

    def __init__(
        self, spec: AugmentationSpec, *, spatial_dims: int, mask_keys: Sequence[str] = ()
    ) -> None:
        self.spec = spec
        self.mask_keys = tuple(mask_keys)
        self.transform = augmentation(spec, spatial_dims=spatial_dims, mask_keys=self.mask_keys)

    def __call__(self, sample: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
        """``sample`` with one random draw of the transforms, reproducible from ``seed``."""
        image = sample["image"]
        data: dict[str, Tensor] = {"image": image}
        for key in self.mask_keys:
            data[key] = sample[key].unsqueeze(0).to(torch.float32)
        self.transform.set_random_state(seed=seed % _SEED_BOUND)
        out = self.transform(data)
        result = dict(sample)
        result["image"] = _plain(out["image"]).to(image.dtype).contiguous()
        for key in self.mask_keys:
            mask = _plain(out[key])[0].round()
            result[key] = mask.to(sample[key].dtype).contiguous()
        return result


class AugmentedCases(Dataset[dict[str, Tensor]]):
    """A training view of a :class:`CaseDataset`: each read is a fresh random augmentation.

    The seed of each draw comes from torch's global random generator, so the augmentation
    follows the local training's seed (:func:`client.trainer.train` seeds that generator,
    from ``os.urandom`` under DP-SGD).
    """

    def __init__(self, cases: CaseDataset, augmenter: Augmenter) -> None:
        self.cases = cases
        self.augmenter = augmenter
        self.modality = cases.modality

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        seed = int(torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64))
        return self.augmenter(self.cases.samples[index], seed)
