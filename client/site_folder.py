"""A site folder: the manifest file in it, and the site's name that keys its state.

A site's state (audit log, privacy ledger, component cache) belongs to the *site*, not to the
folder its data happens to sit in: two hospitals' folders may both be called ``site-0``
under different parents. :func:`site_state_dir` therefore keys state directories by the
manifest's ``site`` name (checked against the one name rule), and
:func:`check_unique_sites` refuses two folders that declare the same site.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from client.errors import SiteError
from client.manifest import load_manifest
from unicon_model.names import path_under

MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.json")
"""File names a site folder's manifest may have, in the order they are looked for."""


def find_manifest(folder: str | Path) -> Path | None:
    """The manifest file of a site folder, or ``None`` if the folder holds none.

    Raises
    ------
    SiteError
        When the folder holds more than one manifest (which one is meant is ambiguous).
    """
    found = [Path(folder) / n for n in MANIFEST_NAMES if (Path(folder) / n).is_file()]
    if len(found) > 1:
        raise SiteError(
            f"{folder} holds {len(found)} manifests ({', '.join(p.name for p in found)}); "
            "keep exactly one"
        )
    return found[0] if found else None


def manifest_in(folder: str | Path) -> Path:
    """The manifest file of a site folder.

    Raises
    ------
    SiteError
        Naming the folder and the accepted file names when there is none (or several).
    """
    found = find_manifest(folder)
    if found is None:
        raise SiteError(f"{folder} holds no site manifest (one of {', '.join(MANIFEST_NAMES)})")
    return found


def site_name(folder: str | Path) -> str:
    """The site name declared by a site folder's manifest (validated)."""
    return load_manifest(manifest_in(folder)).site


def site_state_dir(state_root: str | Path, site: str) -> Path:
    """The state directory of site ``site`` under ``state_root`` (never outside it)."""
    return path_under(state_root, site)


def check_unique_sites(folders: Sequence[str | Path]) -> dict[Path, str]:
    """Site name of each folder; refuse two folders that declare the same site.

    Returns
    -------
    dict
        Folder -> site name, in the given order.

    Raises
    ------
    SiteError
        Naming every site declared by more than one folder, with those folders.
    """
    names = {Path(f): site_name(f) for f in folders}
    seen: dict[str, list[Path]] = {}
    for folder, name in names.items():
        seen.setdefault(name, []).append(folder)
    clashes = {n: fs for n, fs in seen.items() if len(fs) > 1}
    if clashes:
        details = "; ".join(
            f"site {n!r} in {', '.join(str(f) for f in fs)}" for n, fs in clashes.items()
        )
        raise SiteError(
            f"two or more site folders declare the same site name ({details}); each hospital "
            "needs its own site name in its manifest, since state (audit log, privacy ledger, "
            "component cache) is kept per site"
        )
    return names
