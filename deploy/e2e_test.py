"""End-to-end deployment on 127.0.0.1: the steps of deploy/README.md, run by their CLI.

Certificates, a SuperLink with TLS and SuperNode authentication, two registered sites as
real SuperNodes with their own manifests, plans launched with ``unicon plan launch``. Every
process is started by this test in its own session and stopped by its pid (process group).
Run with ``make e2e`` (several minutes: every Flower message starts a ClientApp process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.registry import Registry
from server.superlink import FLOWER_ENV, free_port
from simulations.synthetic import make_sites
from tests.conftest import tiny_plan

UNICON = str(Path(sys.executable).with_name("unicon"))
FLWR = str(Path(sys.executable).with_name("flwr"))
SITES = ["hospital-a", "hospital-b"]


@dataclass
class Federation:
    root: Path
    superlink: str
    ca: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [UNICON, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        return process

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    def site(
        self, name: str, key: str | None = None, data: str | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            "site",
            "run",
            "--superlink",
            self.superlink,
            "--manifest",
            str(self.root / "sites" / (data or name) / "manifest.yaml"),
            "--state-dir",
            str(self.root / "state" / name),
            "--root-certificates",
            str(self.ca),
            "--auth-key",
            str(self.root / "keys" / (key or name)),
            "--port",
            str(free_port()),
        )

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [UNICON, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def plan(self, name: str, stages: int, **stage: Any) -> Path:
        raw = tiny_plan(name=name)
        raw["stages"] = raw["stages"][:stages]
        for spec in raw["stages"]:
            spec.update({"rounds": 1, "min_sites": 2, **stage})
        path = self.root / f"{name}.json"
        path.write_text(json.dumps(raw))
        return path

    def launch(self, plan: Path, registry: Path) -> list[str]:
        return [
            "plan",
            "launch",
            str(plan),
            "--registry",
            str(registry),
            "--superlink",
            self.superlink,
            "--root-certificates",
            str(self.ca),
            "--site-wait",
            "120",
            "--evaluate-timeout",
            "120",
        ]


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("e2e")
    env = {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(root / "flwr-home"),
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    make_sites(root / "sites", sites=2, seed=21, size=16, cases_per_site=8, pet_sites=0)
    port = free_port()
    fed = Federation(root, f"127.0.0.1:{port}", root / "certs" / "ca.crt", env)
    # Step 1: certificates and site keys
    result = fed.run(
        "certs",
        "init",
        "--out",
        str(root / "certs"),
        "--server-name",
        "localhost",
        "--ip",
        "127.0.0.1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in [*SITES, "intruder"]:
        result = fed.run("certs", "site", name, "--out", str(root / "keys"))
        assert result.returncode == 0, result.stdout + result.stderr
    # Step 2: the coordinator's SuperLink with TLS and node authentication
    fed.start(
        "superlink",
        "server",
        "start",
        "--certs",
        str(root / "certs"),
        "--state",
        str(root / "superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
    try:
        wait_until(lambda: listening(port), 60, "the SuperLink")
        # Step 3: register the sites, start their daemons
        for name in SITES:
            result = fed.run(
                "server",
                "add-site",
                str(root / "keys" / f"{name}.pub"),
                "--superlink",
                fed.superlink,
                "--root-certificates",
                str(fed.ca),
                "--state",
                str(root / "coordinator-cli"),
            )
            assert result.returncode == 0, result.stdout + result.stderr
            fed.site(name)
        yield fed
    finally:
        for name in list(fed.processes)[::-1]:
            fed.stop(name)


def test_two_stage_plan_over_two_registered_sites(federation: Federation) -> None:
    registry = federation.root / "registry-main"
    result = federation.run(*federation.launch(federation.plan("deploy", stages=2), registry))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reg = Registry(registry)
    assert reg.versions() == ["v0001-foundation", "v0002-prognosis"]
    for version in reg.versions():
        assert reg.manifest(version).lineage.sites == SITES
    listing = federation.run("model", "ls", "--registry", str(registry))
    assert "v0002-prognosis" in listing.stdout


def test_an_unregistered_site_is_refused(federation: Federation) -> None:
    intruder = federation.site("hospital-a-intruder", key="intruder", data="hospital-a")
    code = intruder.wait(timeout=120)
    output = (federation.root / "hospital-a-intruder.log").read_text()
    federation.processes.pop("hospital-a-intruder")
    assert code == 77, output[-2000:]
    assert "not registered" in output


def test_a_site_lost_mid_stage_does_not_stop_a_stage_that_needs_one(
    federation: Federation,
) -> None:
    registry = federation.root / "registry-dropout"
    plan = federation.plan("dropout", stages=1, rounds=2, min_sites=1, round_timeout=90.0)
    launch = federation.start("launch-dropout", *federation.launch(plan, registry))
    metrics = registry / "runs" / "dropout" / "metrics.jsonl"
    wait_until(
        lambda: metrics.exists() and '"round": 1' in metrics.read_text(),
        600,
        "round 1 of the dropout plan",
    )
    federation.stop("hospital-b")
    assert launch.wait(timeout=900) == 0, (federation.root / "launch-dropout.log").read_text()
    federation.processes.pop("launch-dropout")
    reg = Registry(registry)
    assert reg.versions() == ["v0001-foundation"]
    rounds = [r for r in reg.metrics("dropout") if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["sites"] == SITES or sorted(rounds[0]["sites"]) == SITES
    assert rounds[1]["sites"] == ["hospital-a"]
    federation.site("hospital-b")  # back for the next test


def test_a_killed_server_app_resumes_on_relaunch(federation: Federation) -> None:
    registry = federation.root / "registry-resume"
    plan = federation.plan("resume", stages=1, rounds=2)
    first = federation.start("launch-resume-1", *federation.launch(plan, registry))
    metrics = registry / "runs" / "resume" / "metrics.jsonl"
    wait_until(
        lambda: metrics.exists() and '"round": 1' in metrics.read_text(),
        600,
        "round 1 of the resume plan",
    )
    log = (federation.root / "launch-resume-1.log").read_text()
    run_id = log.split("Successfully started run ")[1].split()[0]
    stopped = subprocess.run(
        [FLWR, "stop", run_id, "unicon"],
        env={**federation.env, "FLWR_HOME": str(registry / ".flwr")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    first.wait(timeout=120)
    federation.processes.pop("launch-resume-1")
    reg = Registry(registry)
    assert reg.versions() == []
    assert reg.progress("resume").current is not None
    second = federation.run(*federation.launch(plan, registry))
    assert second.returncode == 0, second.stdout[-3000:]
    rounds = [r["round"] for r in reg.metrics("resume") if r["kind"] == "round"]
    assert rounds == [1, 2], rounds  # round 1 was not repeated
    assert reg.versions() == ["v0001-foundation"]
