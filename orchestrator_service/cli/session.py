"""`login` and `logout`: the saved session token."""

from __future__ import annotations

import sys

from orchestrator_service import token_file
from orchestrator_service.cli.app import cli
from orchestrator_service.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CliError,
    Connection,
    connection_options,
    error_text,
    exit_code_for,
    interactive,
    utc,
)
from orchestrator_service.client import OrchestratorClient
from tierwriter import runtime


@cli.command()
@connection_options
def login(connection: Connection) -> int:
    """Log in once: the session token is kept in a file only you can read.

    The other commands use it until it expires.

    \b
    Examples:
      tierwriter login -u admin
      tierwriter login -u ann --address orchestrator.example.net:50051 --ca-file ca.pem
    """
    username = connection.user
    if not username and interactive():
        username = input("Username: ").strip()
    if not username:
        raise CliError("give a username: -u USER or $TIERWRITER_USER", EXIT_BAD_INPUT)
    password = connection.password_for(username)
    address = connection.address
    with OrchestratorClient(address, root_certificates=connection.root_certificates()) as client:
        try:
            response = client.login(username, password)
        except runtime.ServiceCallError as e:
            print(f"Error: {error_text(e)}", file=sys.stderr)
            return exit_code_for(e)
    path = token_file.default_path()
    token_file.save(
        token_file.SavedSession(
            address,
            response.user.username,
            response.token,
            response.expire_time.ToNanoseconds() / 1e9,
        ),
        path,
    )
    print(
        f"Logged in to {address} as {response.user.username} ({response.user.role}) until "
        f"{utc(response.expire_time)}; the session is kept in {path}, readable only by you."
    )
    return EXIT_OK


@cli.command()
def logout() -> int:
    """Forget the saved session token."""
    path = token_file.default_path()
    print(f"Logged out: removed {path}." if token_file.delete(path) else "Not logged in.")
    return EXIT_OK
