"""The root of the ``unicon`` command line: coordinators, sites and researchers.

Command tree (each sub-application is defined in its own package and imported here)::

    unicon status                 server.cli.status
    unicon predict                client.predict.predict
    unicon plan check             unicon_model.cli.plan_check
    unicon plan launch            server.cli.plan_launch
    unicon site ...               client.cli.app
    unicon server ...             server.cli.app
    unicon model ...              server.registry_cli.app
    unicon simulate ...           simulations.cli.app
    unicon certs ...              server.certs_cli.app

The ``unicon`` console script runs :func:`main`; tests invoke :data:`app` (also returned by
:func:`full_app`).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import typer

from client import cli as site_cli
from client import predict as predict_cli
from server import certs_cli, registry_cli
from server import cli as server_cli
from simulations import cli as simulate_cli
from unicon_model import cli as model_cli

ROOT_HELP = "UNICON federated: a growing medical-imaging foundation model trained across sites."
"""Help of ``unicon`` itself."""


class SubApp(NamedTuple):
    """A sub-application of the root: where it is defined, its help line, the app."""

    module: str
    help: str
    app: typer.Typer


SUBCOMMANDS: dict[str, SubApp] = {
    "site": SubApp(
        site_cli.__name__, "Hospital site: check a manifest, audit, run the daemon.", site_cli.app
    ),
    "server": SubApp(
        server_cli.__name__, "Coordinator: start the SuperLink, register sites.", server_cli.app
    ),
    "model": SubApp(
        registry_cli.__name__, "Model registry: list, show and export versions.", registry_cli.app
    ),
    "simulate": SubApp(
        simulate_cli.__name__, "Run a whole federation on this machine.", simulate_cli.app
    ),
    "certs": SubApp(
        certs_cli.__name__, "Certificates and keys for TLS and node authentication.", certs_cli.app
    ),
}
"""Sub-application name -> where it comes from, in the order ``unicon --help`` lists them."""


def build_app() -> typer.Typer:
    """A new root application with every command attached.

    The ``plan`` group is built here from the model's ``check`` and the coordinator's
    ``launch``, so neither package's own Typer objects are changed.
    """
    root = typer.Typer(name="unicon", help=ROOT_HELP, no_args_is_help=True, add_completion=False)
    plan = typer.Typer(help=model_cli.PLAN_HELP, no_args_is_help=True)
    plan.command("check")(model_cli.plan_check)
    plan.command("launch")(server_cli.plan_launch)
    root.add_typer(plan, name="plan")
    for name, sub in SUBCOMMANDS.items():
        root.add_typer(sub.app, name=name, help=sub.help)
    root.command("status")(server_cli.status)
    root.command("predict")(predict_cli.predict)
    return root


app = build_app()
"""The ``unicon`` application."""


def full_app() -> typer.Typer:
    """The ``unicon`` application (:data:`app`), every command attached."""
    return app


def main() -> None:
    """Console-script entry point; ``UNICON_LOG_LEVEL`` sets the log level (default WARNING)."""
    level = os.environ.get("UNICON_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    app()
