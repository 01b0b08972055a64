"""The site's privacy ledger: a persistent, anchored record of every DP request it served.

:class:`PrivacyLedger`'s epsilon is the RDP composition (:func:`client.dp.rdp_epsilon`) of
every entry, across rounds, stages, runs and restarts, and
:meth:`PrivacyLedger.check_budget` refuses a request that would exceed the site's cap. The
DP-SGD training itself and the stage's noise are in :mod:`client.dp` (typical use there).

The ledger fails closed: with an anchor (the site's :class:`client.audit.AuditLog`), every
record also appends the ledger's entry count and hash-chain head (:func:`ledger_chain`) to
the audit log, and :meth:`PrivacyLedger.verify`, :meth:`PrivacyLedger.check_budget` and
:meth:`PrivacyLedger.record` refuse a ledger that is missing, emptied, shorter than its
anchor or different from it (:class:`LedgerBehindAnchor`), so deleting the file can never
reset epsilon to 0. A ledger *ahead* of its anchor (a crash between the two writes) is
accepted: it only records more spending.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from client.dp import rdp_epsilon
from client.errors import PrivacyBudgetExceeded, RequestRefused, SiteError
from client.policy import SitePolicy
from unicon_model.durable import atomic_write, file_lock

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
"""Format version of the ledger file."""

_ENTRY_FIELDS = ("key", "noise_multiplier", "sample_rate", "steps", "time", "stage", "round", "run")

LEDGER_GENESIS = "0" * 64
"""Head of the hash chain of an empty ledger."""

_RESTORE_LEDGER = (
    "the site cannot know how much privacy it has spent and refuses DP training. Restore the "
    "ledger from a backup (never delete or empty it; to start over, retire the whole state "
    "directory)"
)


class LedgerError(SiteError):
    """The privacy ledger file cannot be read, is corrupt, or cannot be written."""


class LedgerBehindAnchor(LedgerError, RequestRefused):
    """The ledger is missing, emptied or rolled back: it holds less than its anchor records."""


class LedgerAnchor(Protocol):
    """A second place holding the ledger's entry count and head (the site's audit log)."""

    def ledger_anchor(self) -> tuple[int, str] | None:
        """The last anchored ``(count, head)``, ``None`` if never anchored; raise if broken."""
        ...

    def anchor_ledger(self, count: int, head: str, *, ledger: str | Path, request: str) -> None:
        """Record ``(count, head)`` after the ledger recorded ``request``."""
        ...


def ledger_chain(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Hash chain over ledger entries: ``h[i] = sha256(h[i-1] || canonical JSON of entry i)``.

    Parameters
    ----------
    entries
        The ledger's entries, oldest first.

    Returns
    -------
    list[str]
        ``len(entries) + 1`` hex heads; ``[0]`` is :data:`LEDGER_GENESIS`, ``[-1]`` the head
        of the whole ledger. Canonical JSON: sorted keys, no whitespace, UTF-8.
    """
    heads = [LEDGER_GENESIS]
    for entry in entries:
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(bytes.fromhex(heads[-1]) + text.encode("utf-8")).hexdigest()
        heads.append(digest)
    return heads


def _check_entry(raw: Any, index: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"entries[{index}] is not an object")
    missing = [f for f in _ENTRY_FIELDS if f not in raw]
    if missing:
        raise ValueError(f"entries[{index}] lacks {missing}")
    noise, rate, steps = raw["noise_multiplier"], raw["sample_rate"], raw["steps"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (noise, rate))
    if not numbers or not (noise > 0 and 0 < rate <= 1):
        raise ValueError(f"entries[{index}]: need noise_multiplier > 0 and 0 < sample_rate <= 1")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"entries[{index}]: steps must be an integer >= 1")
    if not isinstance(raw["key"], str):
        raise ValueError(f"entries[{index}]: key must be a string")
    return raw


class PrivacyLedger:
    """The site's persistent record of the DP-SGD requests it served.

    A JSON file (``{"version": 1, "entries": [...]}``), written atomically (temporary file,
    fsync, ``os.replace``) under an exclusive ``fcntl.flock`` on the sibling ``<name>.lock``,
    so concurrent processes and restarts never lose or double an entry. Each entry records one
    served request: ``key`` (e.g. ``"plan/stage/round/modelhash"``), ``noise_multiplier``,
    ``sample_rate``, ``steps``, ``time`` (UTC, ISO 8601), ``stage``, ``round`` and ``run``.

    The file, its lock file and temporary files are 0600, a folder it creates 0700.

    Parameters
    ----------
    path
        The ledger file, e.g. ``<state-dir>/privacy/ledger.json``; a missing file is an
        empty ledger, unless ``anchor`` records entries.
    anchor
        Where the ledger's count and head are anchored (the site's audit log). ``None``
        (tests, tools) checks nothing against an anchor.

    Raises
    ------
    LedgerError
        (From every method reading the file) if the file is corrupt; it is never overwritten.
    """

    def __init__(self, path: str | Path, *, anchor: LedgerAnchor | None = None) -> None:
        self.path = Path(path)
        self.anchor = anchor
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                stack.enter_context(file_lock(self._lock_path, exclusive=exclusive))
            except OSError as e:
                raise LedgerError(
                    f"cannot open the lock file {self._lock_path} of privacy ledger "
                    f"{self.path}: {e.strerror or e}; check the state directory's permissions"
                ) from e
            yield

    def _read(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise LedgerError(f"cannot read privacy ledger {self.path}: {e.strerror or e}") from e
        try:
            if not text.strip():
                raise ValueError("the file is empty")
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION:
                raise ValueError(f"expected an object with version {LEDGER_VERSION}")
            raw_entries = data.get("entries")
            if not isinstance(raw_entries, list):
                raise ValueError("`entries` is not a list")
            return [_check_entry(raw, i) for i, raw in enumerate(raw_entries)]
        except ValueError as e:
            raise LedgerError(
                f"privacy ledger {self.path} is corrupt ({e}); it was left untouched. The site "
                "cannot know how much privacy it has spent: restore the file from a backup "
                "before serving DP requests again"
            ) from e

    def _write(self, entries: list[dict[str, Any]]) -> None:
        payload = json.dumps({"version": LEDGER_VERSION, "entries": entries}, indent=1)
        try:
            atomic_write(self.path, payload, strict_dir=True)
        except OSError as e:
            raise LedgerError(
                f"cannot write privacy ledger {self.path}: {e.strerror or e}; the request's "
                "spending was NOT recorded, do not send its update"
            ) from e

    def _check_anchor(self, entries: list[dict[str, Any]]) -> list[str]:
        """The ledger's hash chain; raise unless it holds everything its anchor records."""
        heads = ledger_chain(entries)
        anchored = None if self.anchor is None else self.anchor.ledger_anchor()
        if anchored is None:
            return heads
        count, head = anchored
        where = f"its anchor in the audit log records {count} entries (head {head[:12]}…)"
        if count > len(entries):
            if not self.path.exists():
                state = f"privacy ledger {self.path} is missing (deleted?) but"
            elif not entries:
                state = f"privacy ledger {self.path} is empty but"
            else:
                state = (
                    f"privacy ledger {self.path} holds {len(entries)} entries (expected at "
                    f"least {count}: entries removed or an older copy restored) but"
                )
            raise LedgerBehindAnchor(f"{state} {where}; {_RESTORE_LEDGER}")
        if heads[count] != head:
            raise LedgerBehindAnchor(
                f"privacy ledger {self.path} differs from its anchor: its first {count} entries "
                f"hash to {heads[count][:12]}… but {where} (entries edited, removed or "
                f"replaced); {_RESTORE_LEDGER}"
            )
        return heads

    def verify(self) -> tuple[int, str]:
        """Check the ledger against its anchor (and the audit log holding the anchor).

        Returns
        -------
        tuple[int, str]
            The ledger's entry count and hash-chain head (:func:`ledger_chain`).

        Raises
        ------
        LedgerBehindAnchor
            The ledger is missing, empty, shorter than or different from its anchor.
        LedgerError
            The ledger file is corrupt or unreadable.
        client.errors.AuditError
            The audit log holding the anchor is broken (truncated, deleted, rewritten).
        """
        with self._locked(exclusive=False):
            entries = self._read()
            heads = self._check_anchor(entries)
        return len(entries), heads[-1]

    def entries(self) -> list[dict[str, Any]]:
        """Every recorded spending entry, oldest first (copies; not checked against the anchor)."""
        with self._locked(exclusive=False):
            return [dict(e) for e in self._read()]

    def has(self, key: str) -> bool:
        """Whether the request ``key`` has been recorded."""
        return any(e["key"] == key for e in self.entries())

    def epsilon(self, delta: float, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        """Epsilon at ``delta`` of the composition of every entry (plus ``extra``).

        Computed with ONE ``opacus.accountants.RDPAccountant`` whose history is every
        entry's ``(noise_multiplier, sample_rate, steps)``: RDP composes additively, so this
        equals one accountant stepped through all the recorded training.

        Parameters
        ----------
        delta
            The delta at which to convert RDP to (epsilon, delta)-DP.
        extra
            Hypothetical further ``(noise_multiplier, sample_rate, steps)`` blocks.

        Returns
        -------
        float
            0 for an empty ledger.
        """
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries()]
        return rdp_epsilon([*history, *extra], delta)

    def epsilon_by_stage(self, delta: float) -> dict[str, float]:
        """Epsilon at ``delta`` spent by each stage alone (entries grouped by ``stage``)."""
        by_stage: dict[str, list[tuple[float, float, int]]] = {}
        for e in self.entries():
            block = (e["noise_multiplier"], e["sample_rate"], e["steps"])
            by_stage.setdefault(str(e["stage"]), []).append(block)
        return {stage: rdp_epsilon(history, delta) for stage, history in by_stage.items()}

    def _append_new(self, request: dict[str, Any]) -> bool:
        """Append and anchor the entry of a checked ``request``; False if already recorded."""
        key = request["key"]
        with self._locked(exclusive=True):
            entries = self._read()
            self._check_anchor(entries)
            if any(e["key"] == key for e in entries):
                logger.info("privacy ledger %s: request %s already recorded", self.path, key)
                return False
            entries.append(
                {
                    **request,
                    "noise_multiplier": float(request["noise_multiplier"]),
                    "sample_rate": float(request["sample_rate"]),
                    "steps": int(request["steps"]),
                    "time": datetime.now(UTC).isoformat(),
                }
            )
            self._write(entries)
            if self.anchor is not None:
                self.anchor.anchor_ledger(
                    len(entries), ledger_chain(entries)[-1], ledger=self.path, request=key
                )
        return True

    def record(
        self,
        key: str,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        stage: str,
        round: int,
        run: str,
    ) -> None:
        """Record the spending of one served request; a key already recorded is ignored.

        Idempotence makes a request replayed after a coordinator crash count once. That is
        only sound if the replay releases nothing new: resend the first reply (or one trained
        with the same noise draw), never a freshly noised update under the same key.

        Parameters
        ----------
        key
            Identity of the request, e.g. ``"plan/stage/round/modelhash"``.
        noise_multiplier, sample_rate, steps
            The DP-SGD training done (see :func:`client.dp.steps_for`).
        stage, round, run
            Where the request came from (for audit and :meth:`epsilon_by_stage`).

        Raises
        ------
        LedgerBehindAnchor
            The ledger is missing, empty or behind its anchor (nothing is written).
        LedgerError
            If the ledger is corrupt or cannot be written.
        client.errors.AuditError
            The anchor's audit log is broken, or the new anchor cannot be appended (the
            spending is then recorded in the ledger but not anchored; do not send the update).
        """
        request = {
            "key": key,
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": steps,
            "time": "",
            "stage": stage,
            "round": round,
            "run": run,
        }
        _check_entry(request, 0)
        if not self._append_new(request):
            return
        logger.info(
            "privacy ledger %s: recorded %s (noise %.4g, rate %.4g, %d steps)",
            self.path,
            key,
            noise_multiplier,
            sample_rate,
            steps,
        )

    def check_budget(
        self, policy: SitePolicy, *, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Projected epsilon (at ``policy.delta``) after serving a request; refuse if too much.

        Parameters
        ----------
        policy
            The site's policy (its ``max_epsilon`` and ``delta``).
        noise_multiplier, sample_rate, steps
            The DP-SGD training the request asks for.

        Returns
        -------
        float
            Epsilon of everything recorded plus this request.

        Raises
        ------
        PrivacyBudgetExceeded
            If the projection exceeds ``policy.max_epsilon``.
        LedgerBehindAnchor
            The ledger is missing, empty or behind its anchor (see :meth:`verify`).
        """
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        block = (noise_multiplier, sample_rate, steps)
        with self._locked(exclusive=False):
            entries = self._read()
            self._check_anchor(entries)
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        spent = rdp_epsilon(history, policy.delta)
        projected = rdp_epsilon([*history, block], policy.delta)
        if policy.max_epsilon is not None and projected > policy.max_epsilon:
            cost = rdp_epsilon([block], policy.delta)
            raise PrivacyBudgetExceeded(
                f"serving this request would exceed the site's privacy budget: spent so far "
                f"epsilon = {spent:.4f}, this request alone {cost:.4f} (noise "
                f"{noise_multiplier:.4g}, sample rate {sample_rate:.4g}, {steps} steps), "
                f"projected total {projected:.4f} > max_epsilon = {policy.max_epsilon:g}, "
                f"all at delta = {policy.delta:g} (ledger {self.path}). The stage needs more "
                "noise or fewer rounds/epochs, or the site raises its max_epsilon"
            )
        return projected
