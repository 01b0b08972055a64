"""Synthetic multi-hospital CT/PET data written in the site format (NIfTI + manifest).

Each case is a torso phantom with per-patient variation (body, lungs, liver, spine, and
MONAI's ``create_test_image_3d`` spheres as small incidental structures) in Hounsfield
units, with one or two liver lesions. Lesion properties drive every label:

- **classification** ``lesion-class``: malignant lesions are larger and enhance more on CT
  and are hot on PET; benign ones are small and faint. The class is drawn first (site
  prevalence), the lesions given the class, and 8 % of labels are flipped, so it is learnable
  but not trivially separable;
- **survival**: times from a Cox model (exponential baseline) on lesion burden, malignancy
  and the clinical covariates ``age`` and ``stage`` with known coefficients, with
  administrative and random censoring;
- **segmentation** ``lesion-seg``: the lesion mask. A quarter of the lesions are barely
  visible on CT (contrast 5–12 HU, below the noise) but hot on PET, so PET can help. Their
  voxels are written to ``truth/subtle/<case>.nii.gz`` and the cases that have any are listed
  in ``truth.json`` (``subtle_cases``); neither is in the manifest, so sites never train on
  them (:mod:`simulations.subtle_lesions` scores the PET gain on these lesions);
- **segmentation** ``organ-seg``: the organ label map ``seg/organs/<case>.nii.gz`` (uint8:
  0 background, 1 liver, 2 lungs, 3 spine, each inside the body; the lesions are part of the
  liver), for an organ → lesion sequence of segmentation tasks. It is read off the phantom
  as drawn, with no random number of its own, so every other file of a case is the same
  with or without it.

Sites differ (non-IID): CT intensity scale and offset, noise, blur, case counts, malignant
prevalence, and only some sites have PET. The generator writes one folder per site with
``manifest.yaml`` in the site format and ``truth.json`` with the generating parameters.
Lesion sizes are set for a 32³ grid of 2 mm voxels and scale with the grid.

**A shifted site** (``make_sites(..., shifted_site=True)``, ``make-data --shifted-site``):
one more hospital, :data:`SHIFTED_SITE`, whose scanner lies outside the ranges the other
sites are drawn from (:data:`SCANNER_RANGES`): its CT gain, offset, noise and blur are each
beyond the upper end of their range (:func:`shifted_profile`), as a hospital with another
scanner and protocol. Held out of training (``unicon simulate --holdout-site
hospital-shifted``) it measures robustness to an unseen hospital. Its patients follow the same
anatomy, lesion and survival models (only the acquisition shifts), and it has PET.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_3d
from scipy.ndimage import gaussian_filter

from client.manifest import manifest_yaml

COX_COEFFICIENTS = {"burden": 0.8, "malignant": 0.9, "age": 0.03, "stage": 0.4}
"""Log hazard ratios of the survival model (burden in cm³-like units, age in years)."""

SPACING_MM = 2.0
TASKS: dict[str, dict[str, Any]] = {
    "lesion-class": {"kind": "classification", "classes": ["benign", "malignant"]},
    "survival": {"kind": "survival"},
    "lesion-seg": {"kind": "segmentation", "labels": ["background", "tumour"]},
    "organ-seg": {"kind": "segmentation", "labels": ["background", "liver", "lungs", "spine"]},
}
ORGANS = {"liver": 1, "lungs": 2, "spine": 3}
"""Values of the organ label map (``organ-seg``); 0 is background (outside the body too)."""


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition and population differences of one synthetic hospital."""

    name: str
    cases: int
    has_pet: bool
    ct_scale: float
    ct_offset: float
    ct_noise: float
    blur: float
    malignant_prevalence: float


SCANNER_RANGES: dict[str, tuple[float, float]] = {
    "ct_scale": (0.9, 1.1),
    "ct_offset": (-30.0, 30.0),
    "ct_noise": (10.0, 30.0),
    "blur": (0.0, 0.8),
}
"""Uniform ranges the sites' scanner parameters are drawn from (HU gain, HU offset, noise SD
in HU, Gaussian blur sigma in voxels)."""

SHIFTED_SITE = "hospital-shifted"
"""Name of the site :func:`shifted_profile` describes."""

SHIFT = {"ct_scale": 0.15, "ct_offset": 50.0, "ct_noise": 15.0, "blur": 0.6}
"""How far beyond the upper end of each :data:`SCANNER_RANGES` range the shifted site lies."""


def site_profiles(
    sites: int, *, seed: int, cases_per_site: int = 24, pet_sites: int | None = None
) -> list[SiteProfile]:
    """Random but reproducible site profiles; the first ``pet_sites`` sites have PET."""
    rng = np.random.default_rng(seed)
    pet_sites = max(1, sites // 2) if pet_sites is None else pet_sites
    profiles = []
    for i in range(sites):
        count = round(cases_per_site * rng.uniform(0.7, 1.3))
        profiles.append(
            SiteProfile(
                name=f"hospital-{chr(ord('a') + i)}" if i < 26 else f"hospital-{i}",
                cases=max(count, 6),
                has_pet=i < pet_sites,
                ct_scale=float(rng.uniform(*SCANNER_RANGES["ct_scale"])),
                ct_offset=float(rng.uniform(*SCANNER_RANGES["ct_offset"])),
                ct_noise=float(rng.uniform(*SCANNER_RANGES["ct_noise"])),
                blur=float(rng.uniform(*SCANNER_RANGES["blur"])),
                malignant_prevalence=float(rng.uniform(0.3, 0.7)),
            )
        )
    return profiles


def shifted_profile(cases_per_site: int = 24) -> SiteProfile:
    """The shifted site: every scanner parameter beyond its :data:`SCANNER_RANGES` range.

    Each of ``ct_scale``, ``ct_offset``, ``ct_noise`` and ``blur`` is the upper end of its
    range plus :data:`SHIFT` (gain 1.25, offset +80 HU, noise SD 45 HU, blur 1.4 voxels), so
    no training site drawn by :func:`site_profiles` has a value as high, whatever the seed.
    Prevalence is 0.5, it has PET, and ``cases_per_site`` cases.
    """
    beyond = {name: SCANNER_RANGES[name][1] + SHIFT[name] for name in SCANNER_RANGES}
    return SiteProfile(
        name=SHIFTED_SITE,
        cases=max(cases_per_site, 6),
        has_pet=True,
        ct_scale=beyond["ct_scale"],
        ct_offset=beyond["ct_offset"],
        ct_noise=beyond["ct_noise"],
        blur=beyond["blur"],
        malignant_prevalence=0.5,
    )


@dataclass(frozen=True)
class Case:
    """One generated case: volumes and labels."""

    ct: np.ndarray
    pet: np.ndarray
    mask: np.ndarray
    malignant: int
    time: float
    event: int
    age: float
    stage: int
    subtle: np.ndarray
    """Voxels of the lesions barely visible on CT (1), as the last lesion drawn left them."""
    organs: np.ndarray
    """Organ label map (uint8, :data:`ORGANS`; the lesions are liver)."""


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    return np.asarray(distance <= 1.0)


def _ball(shape: tuple[int, ...], centre: np.ndarray, radius: float) -> np.ndarray:
    return _ellipsoid(shape, centre, np.full(len(shape), radius))


def _anatomy(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A torso phantom with per-patient variation: HU, SUV, the liver mask and organ labels.

    Axes are (x: right→left, y: anterior→posterior, z: feet→head). Body soft tissue, two
    lungs in the upper half, a large liver in the lower right, the spine behind, and MONAI's
    random spheres as small incidental structures (vessels, bowel) inside the body. The
    organ label map (:data:`ORGANS`) follows the drawing order, so where organs overlap the
    later one (as the image shows it) wins: lungs, then liver, then spine; an incidental
    structure keeps the label of the organ it lies in.
    """
    shape = (size, size, size)
    centre = np.array(shape) / 2

    def jitter(scale: float = 0.05) -> float:
        return float(rng.uniform(1 - scale, 1 + scale))

    body = _ellipsoid(shape, centre, np.array([0.47, 0.40, 0.55]) * size * jitter())
    hu = np.where(body, 40.0, -1000.0)
    suv = np.where(body, 1.0, 0.0)
    organs = np.zeros(shape, dtype=np.uint8)
    for side in (-1, 1):
        lung_centre = centre + np.array([side * 0.2, -0.02, 0.25]) * size * jitter()
        lung = _ellipsoid(shape, lung_centre, np.array([0.14, 0.2, 0.2]) * size * jitter(0.1))
        hu[lung & body] = -800.0
        suv[lung & body] = 0.4
        organs[lung & body] = ORGANS["lungs"]
    liver_centre = centre + np.array([-0.12, -0.03, -0.12]) * size * jitter()
    liver = _ellipsoid(shape, liver_centre, np.array([0.26, 0.27, 0.24]) * size * jitter(0.1))
    liver &= body
    hu[liver] = 60.0
    suv[liver] = 2.0
    organs[liver] = ORGANS["liver"]
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    spine_centre = centre[:2] + np.array([0.0, 0.28]) * size
    spine = ((grids[0] - spine_centre[0]) ** 2 + (grids[1] - spine_centre[1]) ** 2) <= (
        0.07 * size * jitter()
    ) ** 2
    hu[spine & body] = 400.0
    organs[spine & body] = ORGANS["spine"]
    state = np.random.RandomState(int(rng.integers(2**31)))
    _, incidental = create_test_image_3d(
        size,
        size,
        size,
        num_objs=4,
        rad_max=max(size // 12, 2),
        rad_min=1,
        num_seg_classes=1,
        random_state=state,
    )
    vessels = (incidental > 0) & body & ~liver & ~spine
    hu[vessels] = 120.0
    return hu, suv, liver, organs


def _draw_lesions(
    rng: np.random.Generator,
    hu: np.ndarray,
    suv: np.ndarray,
    liver: np.ndarray,
    *,
    n_lesions: int,
    malignant: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw ``n_lesions`` liver lesions into ``hu`` and ``suv`` (in place).

    Returns the lesion mask, the mask of the subtle lesions (recorded only: it draws no
    random number) and the lesion burden (cm³-like units, on the 32³ grid's scale).
    """
    shape = liver.shape
    mask = np.zeros(shape, dtype=np.uint8)
    subtle_mask = np.zeros(shape, dtype=np.uint8)
    burden = 0.0
    liver_voxels = np.argwhere(liver)
    scale = shape[0] / 32  # lesion sizes are set for a 32³ grid
    for _ in range(n_lesions):
        radius = scale * (rng.uniform(3.5, 5.0) if malignant else rng.uniform(1.5, 2.5))
        centre = liver_voxels[int(rng.integers(len(liver_voxels)))]
        lesion = _ball(shape, centre, radius) & liver
        subtle = rng.random() < 0.25
        if subtle:
            contrast = rng.uniform(5, 12)
        elif malignant:
            contrast = rng.uniform(120, 180)
        else:
            contrast = rng.uniform(20, 40)
        hu[lesion] = 60.0 + contrast
        suv[lesion] = rng.uniform(6.0, 9.0) if malignant else rng.uniform(2.5, 3.5)
        mask[lesion] = 1
        subtle_mask[lesion] = int(subtle)  # an overlapping later lesion sets its own contrast
        burden += 4 / 3 * math.pi * (radius / scale) ** 3 * SPACING_MM**3 / 1000.0
    return mask, subtle_mask, burden


def generate_case(rng: np.random.Generator, profile: SiteProfile, *, size: int) -> Case:
    """Draw one case for ``profile`` on a ``size``³ grid.

    Lesions sit in the liver. Malignant lesions are larger and enhance more on CT, and are
    hot on PET; benign ones are small and faint. About a quarter of the lesions are barely
    visible on CT (contrast below the noise) but still hot on PET; ``Case.subtle`` marks their
    voxels (recording it draws no random number, so the rest of the case is unchanged), and
    ``Case.organs`` the organs (read off the phantom, no random number either).
    """
    shape = (size, size, size)
    hu, suv, liver, organs = _anatomy(rng, size)
    malignant_latent = rng.random() < profile.malignant_prevalence
    n_lesions = int(rng.integers(1, 3))
    mask, subtle_mask, burden = _draw_lesions(
        rng, hu, suv, liver, n_lesions=n_lesions, malignant=malignant_latent
    )
    organs[mask > 0] = ORGANS["liver"]  # lesions are liver, also where one covers the spine
    # the observed label is noisy around the latent class (not trivially separable)
    flip = rng.random() < 0.08
    malignant = int(malignant_latent != flip)
    # scanner: scale/offset, blur, noise
    ct = hu * profile.ct_scale + profile.ct_offset
    if profile.blur > 0:
        ct = gaussian_filter(ct, profile.blur)
    ct = ct + rng.normal(0, profile.ct_noise, size=shape)
    pet = gaussian_filter(suv, 1.2) + np.abs(rng.normal(0, 0.15, size=shape))
    # survival from the Cox model, exponential baseline hazard
    age = float(np.clip(rng.normal(64, 9), 30, 90))
    stage = int(rng.integers(1, 5))
    log_hazard = (
        COX_COEFFICIENTS["burden"] * burden
        + COX_COEFFICIENTS["malignant"] * malignant
        + COX_COEFFICIENTS["age"] * (age - 64)
        + COX_COEFFICIENTS["stage"] * (stage - 2.5)
    )
    event_time = rng.exponential(2500.0 / math.exp(log_hazard))
    censor_time = min(rng.uniform(300, 3000), 2500.0)
    time = float(max(min(event_time, censor_time), 1.0))
    event = int(event_time <= censor_time)
    return Case(
        ct=ct.astype(np.float32),
        pet=pet.astype(np.float32),
        mask=mask,
        malignant=malignant,
        time=round(time, 1),
        event=event,
        age=round(age, 1),
        stage=stage,
        subtle=subtle_mask,
        organs=organs,
    )


def _save_nifti(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _write_images(case: Case, case_id: str, folder: Path, *, pet: bool) -> dict[str, str]:
    """Write a case's CT (and PET) volumes under ``folder``; return the manifest's images."""
    images = {"ct": f"ct/{case_id}.nii.gz"}
    _save_nifti(case.ct, folder / images["ct"])
    if pet:
        images["pet"] = f"pet/{case_id}.nii.gz"
        _save_nifti(case.pet, folder / images["pet"])
    return images


def _write_masks(case: Case, case_id: str, folder: Path) -> dict[str, str]:
    """Write a case's lesion mask, organ map and subtle-lesion truth; return its mask labels.

    The subtle-lesion truth is never in the manifest: sites do not train on it.
    """
    labels = {"lesion-seg": f"seg/{case_id}.nii.gz", "organ-seg": f"seg/organs/{case_id}.nii.gz"}
    _save_nifti(case.mask, folder / labels["lesion-seg"])
    _save_nifti(case.organs, folder / labels["organ-seg"])
    _save_nifti(case.subtle, folder / "truth" / "subtle" / f"{case_id}.nii.gz")
    return labels


def _labelled_entry(
    case: Case, case_id: str, split: str, folder: Path, *, pet: bool
) -> dict[str, Any]:
    """Write a labelled case's images and masks; its manifest entry."""
    images = _write_images(case, case_id, folder, pet=pet)
    masks = _write_masks(case, case_id, folder)
    return {
        "id": case_id,
        "split": split,
        "images": images,
        "clinical": {"age": case.age, "stage": case.stage},
        "labels": {
            "lesion-class": TASKS["lesion-class"]["classes"][case.malignant],
            "survival": {"time": case.time, "event": case.event},
            **masks,
        },
    }


def write_site(
    profile: SiteProfile,
    out: Path,
    *,
    seed: int,
    size: int,
    unlabelled: int = 0,
    extra_test: int = 0,
) -> Path:
    """Generate and write one site folder; return its manifest path.

    ``unlabelled`` more ``train`` cases carry images and no label (as most of a hospital's
    archive): only self-supervised stages train on them. ``extra_test`` more labelled
    ``test`` cases (ids ``<site>-t000``, ...) make the test split larger, so benchmarks
    measure with narrower intervals. Each group is drawn from a random stream of its own,
    so the other cases are the same with or without it.
    """
    site_key = sum(profile.name.encode())  # each group of cases: a stream of its own
    rng = np.random.default_rng([seed, site_key])
    folder = out / profile.name
    cases = []
    subtle_cases: list[str] = []
    splits = ["train"] * profile.cases
    n_test = max(2, round(profile.cases * 0.25))
    n_val = max(1, round(profile.cases * 0.1))
    splits[-n_test:] = ["test"] * n_test
    splits[-(n_test + n_val) : -n_test] = ["val"] * n_val
    labelled = [(rng, f"{profile.name}-{i:03d}", split) for i, split in enumerate(splits)]
    held_out = np.random.default_rng([seed, site_key, 2])
    labelled += [(held_out, f"{profile.name}-t{i:03d}", "test") for i in range(extra_test)]
    for stream, case_id, split in labelled:
        case = generate_case(stream, profile, size=size)
        if case.subtle.any():
            subtle_cases.append(case_id)
        cases.append(_labelled_entry(case, case_id, split, folder, pet=profile.has_pet))
    archive = np.random.default_rng([seed, site_key, 1])
    for i in range(unlabelled):
        case = generate_case(archive, profile, size=size)
        case_id = f"{profile.name}-u{i:03d}"
        images = _write_images(case, case_id, folder, pet=profile.has_pet)
        cases.append({"id": case_id, "split": "train", "images": images})
    manifest = {"site": profile.name, "tasks": TASKS, "cases": cases}
    path = folder / "manifest.yaml"
    path.write_text(manifest_yaml(manifest))
    truth = {
        "profile": asdict(profile),
        "cox_coefficients": COX_COEFFICIENTS,
        "seed": seed,
        "size": size,
        "spacing_mm": SPACING_MM,
        "subtle_cases": subtle_cases,
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=2))
    return path


def make_sites(
    out: str | Path,
    *,
    sites: int = 4,
    seed: int = 0,
    size: int = 32,
    cases_per_site: int = 24,
    pet_sites: int | None = None,
    unlabelled_per_site: int = 0,
    shifted_site: bool = False,
    extra_test_per_site: int = 0,
) -> list[Path]:
    """Write ``sites`` synthetic hospitals under ``out``; return their manifest paths.

    Each site also gets ``unlabelled_per_site`` train cases without labels and
    ``extra_test_per_site`` more labelled test cases (see :func:`write_site`).
    ``shifted_site`` adds one more site, :data:`SHIFTED_SITE`, with a scanner outside the
    others' ranges (:func:`shifted_profile`); the other sites are the same with or without it.
    """
    out = Path(out)
    profiles = site_profiles(sites, seed=seed, cases_per_site=cases_per_site, pet_sites=pet_sites)
    if shifted_site:
        profiles.append(shifted_profile(cases_per_site))
    return [
        write_site(
            p,
            out,
            seed=seed,
            size=size,
            unlabelled=unlabelled_per_site,
            extra_test=extra_test_per_site,
        )
        for p in profiles
    ]
