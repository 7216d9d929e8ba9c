"""`login` and `logout`: the saved session token."""

from __future__ import annotations

import sys
import time

import click
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

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
@click.option(
    "--ca-file",
    envvar="TIERWRITER_CA_FILE",
    default="",
    show_envvar=True,
    help="The CA certificate (PEM) of an orchestrator that serves TLS.",
)
def logout(ca_file: str) -> int:
    """Log out: the server revokes the saved session token, then its file is removed.

    A revoked token is refused everywhere, even where it was copied to. When the orchestrator
    cannot be reached, the file is kept so that logout can be tried again.

    \b
    Examples:
      tierwriter logout
      tierwriter logout --ca-file ca.pem
    """
    path = token_file.default_path()
    try:
        session = token_file.read(path)
    except token_file.TokenFileError as e:
        token_file.delete(path)
        print(f"Logged out: removed {path} ({e}).")
        return EXIT_OK
    if session is None:
        print("Not logged in.")
        return EXIT_OK
    if session.expires_at <= time.time():
        token_file.delete(path)
        print(f"Logged out: the session had expired anyway; removed {path}.")
        return EXIT_OK
    roots = Connection("", "", session.address, ca_file).root_certificates()
    with OrchestratorClient(session.address, token=session.token, root_certificates=roots) as c:
        try:
            c.logout()
        except runtime.ServiceCallError as e:
            if e.code != grpc.StatusCode.UNAUTHENTICATED:
                print(
                    f"Error: the token could not be revoked: {error_text(e)}\n"
                    f"{path} is kept: run `tierwriter logout` again (deleting it instead leaves "
                    f"the token working until {utc(Timestamp(seconds=int(session.expires_at)))})",
                    file=sys.stderr,
                )
                return exit_code_for(e)
            token_file.delete(path)  # the server no longer takes it: nothing to revoke
            print(f"Logged out: the server had already ended this session; removed {path}.")
            return EXIT_OK
    token_file.delete(path)
    print(
        f"Logged out of {session.address} as {session.username}: the token is revoked on the "
        f"server and {path} is removed."
    )
    return EXIT_OK
