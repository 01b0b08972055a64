"""Start and stop Flower's SuperLink and launch runs on it with ``flwr run``.

Used by ``unicon server start`` (deployment), ``unicon plan launch`` and ``unicon simulate``
(a private simulation SuperLink). Processes are tracked by pid and stopped by pid, never by
name. Flower's own CLIs are the interface: ``flower-superlink`` and ``flwr run``.

Message sizes: Flower 1.41 has no flag for them. ``flower-superlink`` builds its gRPC
servers with ``grpc.max_send_message_length``/``grpc.max_receive_message_length`` fixed at
``flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH`` (2 GiB - 1), and its one-port HTTP API
(uvicorn) sets no body limit; SuperNodes reach it over HTTP and move arrays as 5 MiB chunks
(``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), so no per-message transport limit applies to a whole
model. Our bound is enforced where our code first touches a message: the ServerApp and
ClientApp adapters check every array against the plan's model size before decoding it
(:mod:`unicon_model.wire`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import tomli_w

from server.errors import CoordinatorError

logger = logging.getLogger(__name__)

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Environment for every Flower process we start (no telemetry, no installs at run time)."""


def flower_environment(**extra: str) -> dict[str, str]:
    """This process's environment for Flower processes: no telemetry or run-time installs,
    and this interpreter's scripts first on ``PATH`` (the SuperLink starts
    ``flower-superexec`` and ``flwr-serverapp`` by name)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, **FLOWER_ENV, "PATH": f"{bin_dir}{os.pathsep}{path}", **extra}


def flower_executable(name: str) -> str:
    """Path of a Flower console script next to this interpreter (or on ``PATH``)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise CoordinatorError(f"{name} not found; install the unicon package with flwr")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tls_arguments(certificates: Path) -> list[str]:
    """The ``flower-superlink`` TLS options for a ``unicon certs init`` folder.

    Raises
    ------
    CoordinatorError
        If the folder lacks ``ca.crt``, ``server.pem`` or ``server.key``.
    """
    missing = [n for n in ("ca.crt", "server.pem", "server.key") if not (certificates / n).exists()]
    if missing:
        raise CoordinatorError(
            f"{certificates} lacks {missing}; create them with `unicon certs init`"
        )
    return [
        "--ssl-ca-certfile",
        str(certificates / "ca.crt"),
        "--ssl-certfile",
        str(certificates / "server.pem"),
        "--ssl-keyfile",
        str(certificates / "server.key"),
    ]


def superlink_command(
    *,
    state_dir: Path,
    host: str,
    port: int,
    certificates: Path | None = None,
    node_auth: bool = True,
    simulation: bool = False,
) -> list[str]:
    """The ``flower-superlink`` command line.

    Parameters
    ----------
    state_dir
        Holds the SuperLink database (``state.db``) and log (``superlink.log``).
    host, port
        Where the SuperLink listens (one port for its Fleet, Control and Runtime APIs).
    certificates
        A folder from ``unicon certs init`` (``ca.crt``, ``server.pem``, ``server.key``):
        TLS on. ``None``: insecure, only for local tests and simulation.
    node_auth
        With certificates, only registered SuperNodes (``unicon server add-site``) may join.
    simulation
        Run simulated SuperNodes (``flwr run --federation-config num-supernodes=N``).
    """
    command = [
        flower_executable("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state_dir / "state.db"),
        "--log-file",
        str(state_dir / "superlink.log"),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if certificates is None:
        command.append("--insecure")
    else:
        command += _tls_arguments(certificates)
        if node_auth:
            command.append("--enable-supernode-auth")
    if simulation:
        command.append("--simulation")
    return command


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``host:port`` accepts connections (or the process exits, or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CoordinatorError(f"process {process.pid} exited with code {process.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise CoordinatorError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process (by pid), then SIGKILL if it does not exit in ``timeout`` s."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


class SuperLink:
    """A SuperLink process owned by this program (a context manager).

    Parameters
    ----------
    state_dir
        Database and log folder.
    host, port
        Listen address (``port=None`` picks a free one).
    certificates, node_auth, simulation
        See :func:`superlink_command`.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        certificates: Path | None = None,
        node_auth: bool = True,
        simulation: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.command = superlink_command(
            state_dir=self.state_dir,
            host=host,
            port=self.port,
            certificates=certificates,
            node_auth=node_auth,
            simulation=simulation,
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``host:port`` for SuperNodes and ``flwr`` (loopback when listening everywhere)."""
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> SuperLink:
        """Start it and wait until it listens."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        output = (self.state_dir / "superlink.out").open("ab")
        self.process = subprocess.Popen(
            self.command, stdout=output, stderr=subprocess.STDOUT, env=flower_environment()
        )
        output.close()
        logger.info("SuperLink pid %d on %s", self.process.pid, self.address)
        try:
            wait_for_port(self.address.split(":")[0], self.port, timeout, self.process)
        except CoordinatorError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop it (by pid)."""
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None = None
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, str | bool] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: connection}}))
    return path


def toml_table(values: Mapping[str, str | int | float | bool]) -> str:
    """Flat key/value TOML, written by :func:`tomli_w.dumps` (other values as strings)."""
    plain = {
        key: value if isinstance(value, str | int | float | bool) else str(value)
        for key, value in values.items()
    }
    return tomli_w.dumps(plain)


def project_root() -> Path:
    """The Flower app folder of this installation (holds ``pyproject.toml``)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise CoordinatorError(
            f"no pyproject.toml at {root}: `flwr run` needs the unicon source folder; "
            "pass --app DIR"
        )
    return root


def flwr_run_command(
    *,
    app: Path,
    connection: str,
    run_config: Path,
    federation_config: Mapping[str, int] | None = None,
    stream: bool = True,
) -> list[str]:
    """The ``flwr run`` command line."""
    command = [
        flower_executable("flwr"),
        "run",
        str(app),
        connection,
        "--run-config",
        str(run_config),
    ]
    if federation_config:
        command += [
            "--federation-config",
            " ".join(f"{k}={v}" for k, v in federation_config.items()),
        ]
    if stream:
        command.append("--stream")
    return command


def flwr_run(
    command: Sequence[str], *, flwr_home: Path, timeout: float | None = None, quiet: bool = False
) -> int:
    """Run ``flwr run`` with ``FLWR_HOME`` set; return its exit code."""
    env = flower_environment(FLWR_HOME=str(flwr_home))
    stdout = subprocess.DEVNULL if quiet else None
    try:
        return subprocess.run(
            list(command), env=env, timeout=timeout, stdout=stdout, check=False
        ).returncode
    except subprocess.TimeoutExpired as e:
        raise CoordinatorError(f"flwr run did not finish within {timeout:.0f} s") from e
