"""The site's privacy ledger and audit log fail closed when a file is deleted or edited.

One template state directory (a DP round of a tiny plan served by a brand-new site, plus one
more recorded spending) is built once per module; each
test damages a copy of it and checks that the site refuses to serve, names the file and the
fix, and writes nothing (the ledger is never recreated at epsilon 0).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from client.errors import AuditError, RequestRefused
from client.ledger import LedgerBehindAnchor, LedgerError
from client.site import Site
from tests.test_site import _dp_plan, request_for
from unicon_model.model import UniconModel

PLAN = _dp_plan()  # the plan of tests/test_site.py: its noise search is memoised


def train_round(site: Site, round_: int) -> None:
    request, arrays = request_for(
        PLAN, "foundation", round_, UniconModel.from_plan(PLAN, through_stage=0)
    )
    site.train(request, arrays)


@pytest.fixture(scope="module")
def manifest(sites_dir: Path) -> Path:
    return sites_dir / "hospital-b" / "manifest.yaml"


@pytest.fixture(scope="module")
def template(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A state directory with two anchored ledger entries, and its ε.

    A brand-new site serves round 1 of the DP stage; a second spending is recorded directly
    (as a second run would), which keeps the module to one training.
    """
    state = tmp_path_factory.mktemp("template") / "state"
    site = Site(manifest_path=manifest, state_dir=state)
    train_round(site, 1)
    first = site.ledger.entries()[0]
    site.ledger.record(
        "run-0/foundation/1/earlier",
        noise_multiplier=first["noise_multiplier"],
        sample_rate=first["sample_rate"],
        steps=first["steps"],
        stage="foundation",
        round=1,
        run="run-0",
    )
    return state, site.epsilon()


@pytest.fixture
def state(template: tuple[Path, float], tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(template[0], copy)  # keeps the files' modes
    return copy


def test_a_brand_new_site_trains_and_its_state_files_are_private(
    template: tuple[Path, float], manifest: Path
) -> None:
    state, spent = template
    site = Site(manifest_path=manifest, state_dir=state)
    assert len(site.ledger.entries()) == 2 and spent > 0
    assert site.audit.verify().ok
    assert site.audit.ledger_anchor() == site.ledger.verify()
    for path in ("audit.jsonl", "audit.anchor", "keys/audit.key", "privacy/ledger.json"):
        assert stat.S_IMODE(os.stat(state / path).st_mode) == 0o600, path
    for folder in (".", "keys", "privacy"):
        assert stat.S_IMODE(os.stat(state / folder).st_mode) == 0o700, folder


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("delete", LedgerBehindAnchor, "is missing (deleted?) but its anchor"),
        ("zero-bytes", LedgerError, "is corrupt (the file is empty)"),
        ("no-entries", LedgerBehindAnchor, "is empty but its anchor"),
        ("drop-one", LedgerBehindAnchor, "holds 1 entries (expected at least 2"),
    ],
)
def test_a_site_with_a_damaged_ledger_refuses_to_start(
    state: Path, manifest: Path, damage: str, error: type[Exception], message: str
) -> None:
    # Prepare: the ledger deleted, emptied or missing an entry
    ledger = state / "privacy" / "ledger.json"
    if damage == "delete":
        ledger.unlink()
    elif damage == "zero-bytes":
        ledger.write_text("")
    else:
        data = json.loads(ledger.read_text())
        data["entries"] = [] if damage == "no-entries" else data["entries"][1:]
        ledger.write_text(json.dumps(data))
    damaged = ledger.read_bytes() if ledger.exists() else None
    # Execute
    with pytest.raises(error) as caught:
        Site(manifest_path=manifest, state_dir=state)
    # Assert: the error names the file and the fix; nothing was written
    assert f"privacy ledger {ledger}" in str(caught.value)
    assert message in str(caught.value) and "backup" in str(caught.value)
    assert (ledger.read_bytes() if ledger.exists() else None) == damaged


def test_a_running_site_refuses_to_train_after_its_ledger_is_deleted(
    state: Path, manifest: Path, template: tuple[Path, float]
) -> None:
    # Prepare: a running site; its ledger is deleted under it (backup kept)
    site = Site(manifest_path=manifest, state_dir=state)
    ledger = state / "privacy" / "ledger.json"
    backup = ledger.read_bytes()
    ledger.unlink()
    # Execute
    with pytest.raises(LedgerBehindAnchor) as caught:
        train_round(site, 2)
    # Assert: refused (a RequestRefused), epsilon not reset: no new ledger at 0
    assert isinstance(caught.value, RequestRefused)
    assert "records 2 entries" in str(caught.value)
    assert not ledger.exists()
    assert [e.event for e in site.audit.entries()][-1] == "refused"
    # restoring the backup is accepted again, with the old spending
    ledger.write_bytes(backup)
    assert site.ledger.verify()[0] == 2
    assert site.epsilon() == pytest.approx(template[1])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_site_with_a_truncated_or_deleted_audit_log_refuses_to_start(
    state: Path, manifest: Path, damage: str
) -> None:
    # Prepare
    log = state / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    if damage == "truncate":
        log.write_text("".join(lines[:-1]))
    else:
        log.unlink()
    # Execute
    with pytest.raises(AuditError) as caught:
        Site(manifest_path=manifest, state_dir=state)
    # Assert
    expected = (
        f"expected {len(lines)}, found {len(lines) - 1}"
        if damage == "truncate"
        else f"audit log {log} is missing (deleted?)"
    )
    assert expected in str(caught.value)
    assert "unicon site audit" in str(caught.value)
