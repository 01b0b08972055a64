"""The SuperLink's command line, the files written for ``flwr``, and processes stopped by pid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.errors import CoordinatorError
from server.superlink import (
    FLOWER_ENV,
    SuperLink,
    flower_environment,
    flwr_run_command,
    free_port,
    stop_process,
    superlink_command,
    toml_table,
    wait_for_port,
    write_connection,
)


def _certificates(folder: Path) -> Path:
    folder.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (folder / name).write_text("not checked here")
    return folder


def _value_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_insecure_command_listens_where_asked_and_keeps_its_state_in_the_folder(
    tmp_path: Path,
) -> None:
    command = superlink_command(state_dir=tmp_path, host="127.0.0.1", port=9093)
    assert Path(command[0]).name == "flower-superlink"
    assert _value_after(command, "--host") == "127.0.0.1"
    assert _value_after(command, "--port") == "9093"
    assert _value_after(command, "--database") == str(tmp_path / "state.db")
    assert _value_after(command, "--log-file") == str(tmp_path / "superlink.log")
    assert _value_after(command, "--isolation") == "subprocess"
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" in command
    for absent in ("--simulation", "--enable-supernode-auth", "--ssl-certfile"):
        assert absent not in command
    simulated = superlink_command(state_dir=tmp_path, host="127.0.0.1", port=1, simulation=True)
    assert simulated[-1] == "--simulation"


def test_certificates_turn_tls_and_node_authentication_on(tmp_path: Path) -> None:
    certs = _certificates(tmp_path / "certs")
    command = superlink_command(state_dir=tmp_path, host="0.0.0.0", port=9093, certificates=certs)
    assert "--insecure" not in command
    assert _value_after(command, "--ssl-ca-certfile") == str(certs / "ca.crt")
    assert _value_after(command, "--ssl-certfile") == str(certs / "server.pem")
    assert _value_after(command, "--ssl-keyfile") == str(certs / "server.key")
    assert command[-1] == "--enable-supernode-auth"
    open_to_all = superlink_command(
        state_dir=tmp_path, host="0.0.0.0", port=9093, certificates=certs, node_auth=False
    )
    assert "--enable-supernode-auth" not in open_to_all and "--ssl-certfile" in open_to_all


def test_a_certificate_folder_lacking_files_is_refused_naming_them(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("x")
    with pytest.raises(CoordinatorError, match=r"\['server.pem', 'server.key'\].*certs init"):
        superlink_command(state_dir=tmp_path, host="127.0.0.1", port=1, certificates=certs)


def test_connection_file_round_trips_through_tomllib(tmp_path: Path) -> None:
    path = write_connection(tmp_path / "flwr-home", "unicon", "127.0.0.1:9093")
    assert path == tmp_path / "flwr-home" / "config.toml"
    assert tomllib.loads(path.read_text()) == {
        "superlink": {
            "default": "unicon",
            "unicon": {"address": "127.0.0.1:9093", "insecure": True},
        }
    }


def test_a_connection_name_with_a_dot_stays_one_key(tmp_path: Path) -> None:
    ca = tmp_path / "certs" / "ca.crt"
    ca.parent.mkdir()
    ca.write_text("x")
    relative = Path(os.path.relpath(ca))
    path = write_connection(tmp_path, "site.a", "coordinator.example:9093", relative)
    superlink = tomllib.loads(path.read_text())["superlink"]
    assert superlink == {
        "default": "site.a",
        "site.a": {"address": "coordinator.example:9093", "root-certificates": str(ca.resolve())},
    }


def test_toml_table_round_trips_plain_values_and_writes_others_as_strings() -> None:
    values: dict[str, Any] = {
        "plan": 'C:\\plans\\"odd" name.toml',
        "site-wait": 60,
        "fraction": 0.25,
        "stream": False,
        "note": "two\nlines",
        "registry": Path("/srv/registry"),
    }
    assert tomllib.loads(toml_table(values)) == {
        **values,
        "registry": "/srv/registry",
    }


def test_flwr_run_command_passes_the_config_and_the_federation(tmp_path: Path) -> None:
    command = flwr_run_command(
        app=tmp_path / "app",
        connection="simulation",
        run_config=tmp_path / "run.toml",
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 2},
    )
    assert Path(command[0]).name == "flwr"
    assert command[1:] == [
        "run",
        str(tmp_path / "app"),
        "simulation",
        "--run-config",
        str(tmp_path / "run.toml"),
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=2",
        "--stream",
    ]
    quiet = flwr_run_command(
        app=tmp_path, connection="unicon", run_config=tmp_path / "r.toml", stream=False
    )
    assert "--stream" not in quiet and "--federation-config" not in quiet


def test_flower_processes_get_no_telemetry_and_this_interpreter_first_on_path() -> None:
    env = flower_environment(FLWR_HOME="/tmp/home")
    for key, value in FLOWER_ENV.items():
        assert env[key] == value
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["FLWR_HOME"] == "/tmp/home"


def test_address_is_loopback_when_listening_everywhere(tmp_path: Path) -> None:
    everywhere = SuperLink(tmp_path, host="0.0.0.0", port=9093)
    assert everywhere.address == "127.0.0.1:9093"
    assert _value_after(everywhere.command, "--host") == "0.0.0.0"
    assert everywhere.process is None
    everywhere.stop()  # never started: nothing to stop, no error


def test_waiting_fails_when_the_process_exits_or_nothing_listens() -> None:
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    exited.wait(timeout=30)
    with pytest.raises(CoordinatorError, match=f"process {exited.pid} exited with code 3"):
        wait_for_port("127.0.0.1", free_port(), 5.0, exited)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        port = free_port()
        with pytest.raises(CoordinatorError, match=f"nothing listens on 127.0.0.1:{port}"):
            wait_for_port("127.0.0.1", port, 0.3, sleeper)
    finally:
        stop_process(sleeper)
    assert sleeper.returncode == -15


def test_stop_process_kills_by_pid_what_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"
    started = time.monotonic()
    stop_process(stubborn, timeout=0.5)
    stubborn.stdout.close()
    assert stubborn.returncode == -9  # SIGTERM ignored, then SIGKILL
    assert time.monotonic() - started < 10
    stop_process(stubborn)  # already gone: no error


@pytest.mark.slow
def test_a_real_superlink_starts_on_loopback_and_stops_by_pid(tmp_path: Path) -> None:
    # 3-20 s to start on 2 shared cores, hence slow
    with SuperLink(tmp_path / "state") as link:
        assert link.process is not None and link.process.poll() is None
        host, port = link.address.split(":")
        assert host == "127.0.0.1" and int(port) == link.port
        with socket.create_connection((host, link.port), timeout=5):
            pass
    assert link.process.returncode == -15  # stopped by SIGTERM to its pid
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", link.port)) != 0
    assert (tmp_path / "state" / "state.db").exists()
    assert (tmp_path / "state" / "superlink.out").exists()
