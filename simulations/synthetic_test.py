"""Generated hospitals: extra test cases leave every other case as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import yaml

from simulations.synthetic import make_sites


def _manifest(folder: Path) -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load((folder / "manifest.yaml").read_text()))


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(cast(Any, nib.load(path)).get_fdata())


def test_extra_test_cases_add_to_the_test_split_and_change_nothing_else(tmp_path: Path) -> None:
    (plain,) = make_sites(tmp_path / "plain", sites=1, seed=4, size=16, cases_per_site=8)
    (more,) = make_sites(
        tmp_path / "more", sites=1, seed=4, size=16, cases_per_site=8, extra_test_per_site=5
    )
    before, after = _manifest(plain.parent), _manifest(more.parent)
    extra = [c for c in after["cases"] if c["id"] not in {b["id"] for b in before["cases"]}]
    assert after["cases"][: len(before["cases"])] == before["cases"]
    site = before["site"]
    assert [c["id"] for c in extra] == [f"{site}-t{i:03d}" for i in range(5)]
    assert {c["split"] for c in extra} == {"test"}
    assert all(set(c["labels"]) == set(before["cases"][0]["labels"]) for c in extra)
    for case in before["cases"]:  # the same voxels, not only the same entries
        for key, rel in case["images"].items():
            same = np.array_equal(_voxels(plain.parent / rel), _voxels(more.parent / rel))
            assert same, (case["id"], key)
    # the extra cases are new draws, not copies of the labelled ones
    first_extra = _voxels(more.parent / extra[0]["images"]["ct"])
    assert not any(
        np.array_equal(first_extra, _voxels(plain.parent / c["images"]["ct"]))
        for c in before["cases"]
    )


def test_make_data_extra_test_writes_that_many_more_test_cases_per_site(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    args = ["make-data", "--sites", "2", "--size", "8", "--cases", "6"]
    result = CliRunner().invoke(app, [*args, "--extra-test", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for site in ("hospital-a", "hospital-b"):
        cases = _manifest(tmp_path / site)["cases"]
        assert sum(c["id"].startswith(f"{site}-t") for c in cases) == 3
        assert sum(c["split"] == "test" for c in cases) == 3 + 2  # max(2, 25 % of 6) own
    refused = CliRunner().invoke(app, [*args, "--extra-test", "-1", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "extra-test" in refused.output
