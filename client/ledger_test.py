"""Tests of the site's persistent privacy ledger: RDP accounting, budget and anchor."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.audit import AuditLog
from client.dp import make_private, stage_noise_multiplier, steps_for
from client.errors import AuditError, PrivacyBudgetExceeded, RequestRefused, SiteError
from client.ledger import LedgerBehindAnchor, LedgerError, PrivacyLedger, ledger_chain
from client.policy import SitePolicy

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def reference_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon of an Opacus accountant that was stepped through ``history`` one step at a time."""
    accountant = RDPAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


def test_ledger_equals_an_opacus_accountant_stepped_through_three_dp_rounds(
    tmp_path: Path,
) -> None:
    # Prepare: stage noise chosen once for 3 rounds of 1 epoch over 60 examples
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(60, 4), torch.randn(60, 1))
    model = nn.Linear(4, 1)
    rounds, target = 3, 2.0
    sample_rate, steps = steps_for(len(data), 10, 1)
    noise = stage_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=sample_rate, total_steps=rounds * steps
    )
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.json")
    reference = RDPAccountant()  # persisted across rounds, as the engine's accountant would be
    generator = torch.Generator().manual_seed(1)
    epsilons: list[float] = []
    # Execute: each round wraps afresh, trains, and records its spending
    for rnd in range(rounds):
        loader = DataLoader(data, batch_size=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        net, dp_opt, dp_loader = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=noise,
            max_grad_norm=1.0,
            generator=generator,
        )
        dp_opt.attach_step_hook(reference.get_optimizer_hook_fn(sample_rate=1 / len(loader)))
        taken = 0
        for xb, yb in dp_loader:
            dp_opt.zero_grad()
            nn.functional.mse_loss(net(xb), yb).backward()
            dp_opt.step()
            taken += 1
        assert taken == steps
        assert net.to_standard_module() is model
        ledger.record(
            f"plan/s1/{rnd}/hash{rnd}",
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            stage="s1",
            round=rnd,
            run="run-1",
        )
        epsilons.append(ledger.epsilon(DELTA))
        # Assert (per round): the ledger equals the accountant stepped through the training
        assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=DELTA), abs=1e-9)
    # Assert: monotone growth, and the stage ends just under its target
    assert reference.history == [(noise, sample_rate, rounds * steps)]
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert 0.9 * target <= epsilons[-1] <= target
    assert ledger.epsilon_by_stage(DELTA) == {"s1": pytest.approx(epsilons[-1], abs=1e-12)}
    assert [e["round"] for e in ledger.entries()] == [0, 1, 2]
    assert torch.isfinite(model.weight).all()


def test_budget_survives_a_restart_and_refuses_a_request_crossing_the_cap(
    tmp_path: Path,
) -> None:
    # Prepare: another process records two stages' spending and exits
    path = tmp_path / "state" / "privacy" / "ledger.json"
    code = (
        "import sys\n"
        "from client.ledger import PrivacyLedger\n"
        "ledger = PrivacyLedger(sys.argv[1])\n"
        "ledger.record('p/a/0/h', noise_multiplier=1.0, sample_rate=0.01, steps=100,"
        " stage='a', round=0, run='r1')\n"
        "ledger.record('p/b/0/h', noise_multiplier=1.5, sample_rate=0.02, steps=50,"
        " stage='b', round=0, run='r1')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=True, timeout=60)
    recorded = [(1.0, 0.01, 100), (1.5, 0.02, 50)]
    big, small = (0.8, 0.05, 200), (5.0, 0.01, 10)
    spent = reference_epsilon(recorded)
    cap = (reference_epsilon([*recorded, big]) + reference_epsilon([*recorded, small])) / 2
    policy = SitePolicy(max_epsilon=cap, delta=DELTA)
    # Execute: a fresh instance in this process reads the same file
    ledger = PrivacyLedger(path)
    seen = ledger.epsilon(DELTA)
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.check_budget(policy, noise_multiplier=big[0], sample_rate=big[1], steps=big[2])
    projected = ledger.check_budget(
        policy, noise_multiplier=small[0], sample_rate=small[1], steps=small[2]
    )
    # Assert: same epsilon as an accountant stepped through the recorded training
    assert seen == pytest.approx(spent, abs=1e-9)
    assert ledger.epsilon_by_stage(DELTA) == {
        "a": pytest.approx(reference_epsilon(recorded[:1]), abs=1e-9),
        "b": pytest.approx(reference_epsilon(recorded[1:]), abs=1e-9),
    }
    assert projected == pytest.approx(reference_epsilon([*recorded, small]), abs=1e-9)
    assert spent < projected < cap
    message = str(caught.value)
    assert f"spent so far epsilon = {spent:.4f}" in message
    assert f"this request alone {reference_epsilon([big]):.4f}" in message
    assert f"projected total {reference_epsilon([*recorded, big]):.4f}" in message
    assert f"max_epsilon = {cap:g}" in message and "delta = 1e-05" in message
    assert isinstance(caught.value, SiteError)


def test_record_is_idempotent_per_request_key(tmp_path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    # Execute: the same key twice (a replay), then a new key with the same training
    ledger.record(
        "p/s/0/h", noise_multiplier=1.2, sample_rate=0.1, steps=30, stage="s", round=0, run="r"
    )
    once = ledger.epsilon(DELTA)
    PrivacyLedger(tmp_path / "ledger.json").record(
        "p/s/0/h", noise_multiplier=1.2, sample_rate=0.1, steps=30, stage="s", round=0, run="r"
    )
    replayed = ledger.epsilon(DELTA)
    ledger.record(
        "p/s/1/h", noise_multiplier=1.2, sample_rate=0.1, steps=30, stage="s", round=1, run="r"
    )
    # Assert
    assert once == replayed == pytest.approx(reference_epsilon([(1.2, 0.1, 30)]), abs=1e-9)
    assert ledger.epsilon(DELTA) == pytest.approx(reference_epsilon([(1.2, 0.1, 60)]), abs=1e-9)
    assert len(ledger.entries()) == 2
    assert ledger.has("p/s/0/h") and not ledger.has("p/s/2/h")
    assert PrivacyLedger(tmp_path / "empty.json").epsilon(DELTA) == 0.0


@pytest.mark.parametrize(
    "text",
    ['{"version": 1, "entries": [', '{"version": 1, "entries": [{"key": "k", "steps": "x"}]}'],
)
def test_corrupt_ledger_is_reported_and_left_untouched(tmp_path: Path, text: str) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    path.write_text(text)
    ledger = PrivacyLedger(path)
    # Execute
    with pytest.raises(LedgerError) as read_error:
        ledger.epsilon(DELTA)
    with pytest.raises(LedgerError) as write_error:
        ledger.record(
            "k2", noise_multiplier=1.0, sample_rate=0.1, steps=5, stage="s", round=0, run="r"
        )
    # Assert: a SiteError naming the file, and the file's bytes unchanged
    for error in (read_error.value, write_error.value):
        assert isinstance(error, SiteError)
        assert f"privacy ledger {path} is corrupt" in str(error)
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]


# ---------------------------------------------------------------- fail closed: the anchor


def anchored_ledger(tmp_path: Path, rounds: int = 3) -> PrivacyLedger:
    """A ledger of ``rounds`` entries anchored in an audit log next to it."""
    ledger = PrivacyLedger(
        tmp_path / "privacy" / "ledger.json", anchor=AuditLog(tmp_path / "audit.jsonl")
    )
    for i in range(rounds):
        ledger.record(
            f"r/s/{i}/h",
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=10,
            stage="s",
            round=i,
            run="r",
        )
    return ledger


def test_each_record_anchors_count_and_head_in_the_audit_log(tmp_path: Path) -> None:
    ledger = anchored_ledger(tmp_path)
    anchors = [e.record for e in AuditLog(tmp_path / "audit.jsonl").entries()]
    heads = ledger_chain(ledger.entries())
    assert [(a["count"], a["head"], a["request"]) for a in anchors] == [
        (1, heads[1], "r/s/0/h"),
        (2, heads[2], "r/s/1/h"),
        (3, heads[3], "r/s/2/h"),
    ]
    assert ledger.verify() == (3, heads[3])
    assert heads[0] == "0" * 64


def _record(ledger: PrivacyLedger, key: str = "r/s/9/h") -> None:
    ledger.record(key, noise_multiplier=1.0, sample_rate=0.1, steps=10, stage="s", round=9, run="r")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("delete", "is missing (deleted?) but its anchor in the audit log records 3 entries"),
        ("no-entries", "is empty but its anchor in the audit log records 3 entries"),
        ("drop-middle", "holds 2 entries (expected at least 3"),
        ("edit", "differs from its anchor: its first 3 entries hash to"),
    ],
)
def test_a_ledger_behind_its_anchor_is_refused_and_not_reset(
    tmp_path: Path, damage: str, message: str
) -> None:
    # Prepare: three anchored rounds, then the ledger deleted, emptied, shortened or edited
    ledger = anchored_ledger(tmp_path)
    path = ledger.path
    data = json.loads(path.read_text())
    if damage == "delete":
        path.unlink()
    elif damage == "no-entries":
        path.write_text(json.dumps({"version": 1, "entries": []}))
    elif damage == "drop-middle":
        del data["entries"][1]
        path.write_text(json.dumps(data))
    else:
        data["entries"][2]["steps"] = 1  # spend less than was spent
        path.write_text(json.dumps(data))
    damaged = path.read_bytes() if path.exists() else None
    audit_before = (tmp_path / "audit.jsonl").read_bytes()
    policy = SitePolicy(max_epsilon=100.0, delta=DELTA)
    # Execute / Assert: every entry point refuses, naming the file and the fix
    for call in (
        ledger.verify,
        lambda: ledger.check_budget(policy, noise_multiplier=1.0, sample_rate=0.1, steps=10),
        lambda: _record(ledger),
    ):
        with pytest.raises(LedgerBehindAnchor) as caught:
            call()
        assert str(path) in str(caught.value) and message in str(caught.value)
        assert "Restore the ledger from a backup" in str(caught.value)
        assert isinstance(caught.value, RequestRefused)
    # nothing was written: the ledger is not recreated at epsilon 0, the anchor is unchanged
    assert (path.read_bytes() if path.exists() else None) == damaged
    assert (tmp_path / "audit.jsonl").read_bytes() == audit_before


def test_an_empty_ledger_file_is_a_clear_error_even_without_an_anchor(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("")
    with pytest.raises(LedgerError, match=rf"privacy ledger {path} is corrupt \(the file is empty"):
        PrivacyLedger(path).epsilon(DELTA)
    assert path.read_text() == ""


def test_a_ledger_ahead_of_its_anchor_after_a_crash_is_accepted(tmp_path: Path) -> None:
    # Prepare: the third record reached the ledger, but not the audit log (crash between)
    ledger = anchored_ledger(tmp_path, rounds=2)
    unanchored = PrivacyLedger(ledger.path)  # writes no anchor
    _record(unanchored, "r/s/2/h")
    # Execute / Assert: accepted, and the next record anchors all four
    assert ledger.verify()[0] == 3
    _record(ledger, "r/s/3/h")
    assert (
        AuditLog(tmp_path / "audit.jsonl").ledger_anchor()
        == ledger.verify()
        == (
            4,
            ledger_chain(ledger.entries())[-1],
        )
    )


def test_a_ledger_never_anchored_is_adopted_and_a_broken_audit_log_refused(
    tmp_path: Path,
) -> None:
    # Prepare: a ledger from before anchoring (two entries), then an anchor is attached
    _record(PrivacyLedger(tmp_path / "privacy" / "ledger.json"), "old/1")
    _record(PrivacyLedger(tmp_path / "privacy" / "ledger.json"), "old/2")
    ledger = PrivacyLedger(
        tmp_path / "privacy" / "ledger.json", anchor=AuditLog(tmp_path / "audit.jsonl")
    )
    # Execute / Assert: adopted, anchored at the next record
    assert ledger.verify()[0] == 2
    _record(ledger, "new/3")
    assert AuditLog(tmp_path / "audit.jsonl").ledger_anchor() == ledger.verify()
    # the audit log holding the anchor truncated: the ledger cannot be checked, refused
    (tmp_path / "audit.jsonl").write_text("")
    with pytest.raises(AuditError, match="expected 1, found 0"):
        ledger.verify()


def test_ledger_files_are_0600_and_its_folder_0700(tmp_path: Path) -> None:
    ledger = anchored_ledger(tmp_path, rounds=1)
    assert stat.S_IMODE(os.stat(ledger.path.parent).st_mode) == 0o700
    for name in ("ledger.json", "ledger.json.lock"):
        assert stat.S_IMODE(os.stat(ledger.path.parent / name).st_mode) == 0o600, name
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == [
        "ledger.json",
        "ledger.json.lock",
    ]  # no temporary file left behind
