"""What every command shares: exit codes, how errors read, the connection options, how a
watched job is shown (plain lines, NDJSON, or bars on a terminal)."""

from __future__ import annotations

import functools
import getpass
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, TextIO

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator_service import token_file
from orchestrator_service.client import EventStream, OrchestratorClient
from orchestrator_service.console import (
    event_lines,
)
from tierwriter import runtime
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run stopped early or a service failed during it
EXIT_BAD_INPUT = 2  # a bad job file or bad arguments; nothing was written
EXIT_UNAUTHENTICATED = 3  # not logged in, wrong credentials, or not allowed to do that
EXIT_UNAVAILABLE = 4  # a service could not be reached
EXIT_BUSY = 5  # refused for now (too many watches, login brake, a quota): try later
# Every job completed, but not every requested article was written within its range: some
# failed, are short or long, were skipped for the budget or got no title (the summary says).
EXIT_INCOMPLETE = 6
EXIT_INTERRUPTED = 130

DEFAULT_ADDRESS = "127.0.0.1:50051"  # ORCHESTRATOR_ADDRESS's default, as the services have it


class CliError(Exception):
    """A problem the user can fix before any call is made; printed as `Error: …`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Codes whose message is meant for the user as it is (no service address around it).
_SHOWN_AS_IS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def exit_code_for(error: runtime.ServiceCallError) -> int:
    return {
        grpc.StatusCode.INVALID_ARGUMENT: EXIT_BAD_INPUT,
        grpc.StatusCode.NOT_FOUND: EXIT_BAD_INPUT,
        grpc.StatusCode.ALREADY_EXISTS: EXIT_BAD_INPUT,
        grpc.StatusCode.FAILED_PRECONDITION: EXIT_BAD_INPUT,
        grpc.StatusCode.UNAUTHENTICATED: EXIT_UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED: EXIT_UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_BUSY,
        grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    }.get(error.code, EXIT_RUN_FAILED)  # type: ignore[arg-type]


def error_text(error: runtime.ServiceCallError) -> str:
    """What to print for a failed call: the server's words when they are meant for the user."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if error.details.startswith("quota:"):  # not busy: the caller's own limit
            return error.details
        return f"the orchestrator is busy: {error.details}"
    if error.code in _SHOWN_AS_IS:
        return error.details
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return f"{error} (an orchestrator that serves TLS needs --ca-file or TIERWRITER_CA_FILE)"
    return str(error)


def as_json(message: Message) -> str:
    """A message as one line of JSON: the protos' field names, enums by name, int64s as
    numbers, fields at their zero value left out (protobuf's JSON mapping)."""
    document = json_format.MessageToDict(
        message, preserving_proto_field_name=True, unquote_int64_if_possible=True
    )
    return json.dumps(document, ensure_ascii=False)


@contextmanager
def event_view(out: TextIO, ndjson: bool) -> Iterator[Callable[[pb.JobEvent], None]]:
    """How events are shown: as NDJSON; on a terminal, as bars per tier and for the job with
    the lines that matter above them (rich, imported only then); else as the plain lines."""
    if ndjson:
        yield lambda event: print(as_json(event), file=out, flush=True)
        return
    # TTY_COMPATIBLE=1 makes rich treat any output as a terminal (the tests use it).
    if out.isatty() or os.environ.get("TTY_COMPATIBLE") == "1":
        from rich.console import Console

        from orchestrator_service.live_progress import LiveProgress

        console = Console(file=out)
        if console.is_terminal:
            with LiveProgress(console) as live:
                yield live.show
            return

    def plain(event: pb.JobEvent) -> None:
        for line in event_lines(event):
            print(line, file=out, flush=True)

    yield plain


def watch_and_print(
    client: OrchestratorClient,
    stream: EventStream,
    out: TextIO,
    ndjson: bool = False,
    written: Callable[[pb.Summary], bool] | None = None,
) -> int:
    """Print every event of the watched jobs as it arrives (as console lines, or with `ndjson`
    as one JSON object each); return the exit code (the worst over the jobs: a run that stopped
    early, then one that completed without every article written in range: all_written, or
    `written` when given). The first Ctrl-C
    cancels the watched jobs (queued ones at once, running ones cleanly) and waits for their
    summaries; a second leaves at once, and the cancelled jobs wind down on the server.
    Leaving any other way cancels nothing: the jobs run on.

    A thread reads the stream: a Ctrl-C landing inside gRPC's own wait would corrupt the call,
    while one landing in queue.get() is harmless."""
    received: queue.Queue[pb.JobEvent | runtime.ServiceCallError | None] = queue.Queue()

    def read() -> None:
        try:
            for event in stream:
                received.put(event)
        except runtime.ServiceCallError as e:
            received.put(e)
        finally:
            received.put(None)

    reader = threading.Thread(target=read, name="events", daemon=True)
    position = {job_id: n for n, job_id in enumerate(stream.job_ids)}
    finished: set[int] = set()
    exit_code, cancelling, incomplete = EXIT_OK, False, False
    with stream, event_view(out, ndjson) as show:
        reader.start()
        while True:
            try:
                item = received.get(timeout=0.2)
                if item is None:
                    break
                if isinstance(item, runtime.ServiceCallError):
                    print(f"Error: {error_text(item)}", file=sys.stderr)
                    return exit_code_for(item)
                kind = item.WhichOneof("event")
                if kind == "job_started" and len(position) > 1:  # "Job 2/3": the file's order
                    item.job_started.job_number = position.get(item.job_id, 0)
                    item.job_started.job_count = len(position)
                show(item)
                if kind == "run_finished":
                    finished.add(item.job_id)
                    if not item.run_finished.ok:
                        exit_code = EXIT_RUN_FAILED
                    incomplete = incomplete or not (written or all_written)(
                        item.run_finished.summary
                    )
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if cancelling:
                    return _left_at_once()
                cancelling = True
                try:
                    _cancel(client, [j for j in stream.job_ids if j not in finished])
                except KeyboardInterrupt:  # the second press came while the first was answered
                    return _left_at_once()
    if cancelling:
        return EXIT_INTERRUPTED
    for job_id in stream.job_ids:
        if job_id in finished:
            continue
        # No summary came: a watch --after past the job's last event, or a job cancelled while
        # queued (it never ran). The job's stored state says how it ended.
        job = client.get_job(job_id).job
        if job.status != JobStatus.JOB_STATUS_COMPLETED:
            return EXIT_RUN_FAILED
        incomplete = incomplete or not all_written(job)
    if exit_code == EXIT_OK and incomplete:
        return EXIT_INCOMPLETE
    return exit_code


def all_written(counts: pb.Summary | pb.JobInfo) -> bool:
    """Whether every requested article was written within its tier's range (generated or
    augmented): none failed, short, long, skipped, untitled or not started. A run's summary
    and a stored job's info count alike."""
    return counts.generated_articles + counts.augmented_articles >= counts.requested_articles


def _left_at_once() -> int:
    print(
        "\nLeft at once: the jobs are cancelled on the server; in-flight "
        "articles are still recorded.",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _cancel(client: OrchestratorClient, job_ids: Sequence[int]) -> None:
    messages = []
    for job_id in job_ids:
        try:
            messages.append(client.cancel_job(job_id))
        except runtime.ServiceCallError as e:
            messages.append(f"could not cancel job {job_id}: {e.details}")
    print(
        f"\nCtrl-C: {'; '.join(messages) or 'nothing left to cancel'}. Waiting for the "
        "summary; press Ctrl-C again to leave at once.",
        file=sys.stderr,
        flush=True,
    )


def interactive() -> bool:
    return sys.stdin.isatty()


@dataclass(frozen=True)
class Connection:
    """Where the orchestrator is and who calls it, from the options every client command has."""

    user: str  # -u, else $TIERWRITER_USER; "" for the saved login
    password: str = field(repr=False)  # -p, else $TIERWRITER_PASSWORD; "" to be asked
    address: str
    ca_file: str  # "" for plaintext

    def password_for(self, username: str) -> str:
        """The password given, else one asked for on a terminal."""
        password = self.password
        if not password and interactive():
            password = getpass.getpass(f"Password for {username}: ")
        if not password:
            raise CliError(
                f"no password for {username!r}: set TIERWRITER_PASSWORD, pass -p, or run on a "
                "terminal to be asked",
                EXIT_UNAUTHENTICATED,
            )
        return password

    def root_certificates(self) -> bytes | None:
        """The CA bundle to trust for TLS; None: plaintext."""
        if not self.ca_file:
            return None
        try:
            return Path(self.ca_file).read_bytes()
        except OSError as e:
            raise CliError(
                f"cannot read CA file {self.ca_file}: {e.strerror}", EXIT_BAD_INPUT
            ) from e

    def open_client(self) -> OrchestratorClient:
        """A client with the caller's credentials: a username with a password, else the
        session saved by `tierwriter login`."""
        roots = self.root_certificates()
        if self.user:
            password = self.password_for(self.user)
            return OrchestratorClient(self.address, self.user, password, root_certificates=roots)
        try:
            session = token_file.load(token_file.default_path(), self.address)
        except token_file.TokenFileError as e:
            raise CliError(str(e), EXIT_UNAUTHENTICATED) from e
        if session is None:
            raise CliError(
                "not logged in: run `tierwriter login`, or pass -u USER (or set "
                "TIERWRITER_USER and TIERWRITER_PASSWORD)",
                EXIT_UNAUTHENTICATED,
            )
        return OrchestratorClient(self.address, token=session.token, root_certificates=roots)

    def run(self, action: Callable[[OrchestratorClient], int]) -> int:
        """Run `action` with a client; a failed call prints its reason and gives its exit
        code."""
        with self.open_client() as client:
            try:
                return action(client)
            except runtime.ServiceCallError as e:
                print(f"Error: {error_text(e)}", file=sys.stderr)
                return exit_code_for(e)


def connection_options(command: Callable[..., int]) -> Callable[..., int]:
    """The options of every command that calls the orchestrator, handed to it as a Connection."""

    @click.option(
        "-u",
        "--user",
        envvar="TIERWRITER_USER",
        default="",
        show_envvar=True,
        help="Username (else the saved login).",
    )
    @click.option(
        "-p",
        "--password",
        envvar="TIERWRITER_PASSWORD",
        default="",
        show_envvar=True,
        help="Password (else asked on a terminal). On the command line it is visible to other "
        "local users: prefer the variable or the prompt.",
    )
    @click.option(
        "--address",
        envvar="ORCHESTRATOR_ADDRESS",
        default=DEFAULT_ADDRESS,
        show_default=True,
        show_envvar=True,
        help="Orchestrator address.",
    )
    @click.option(
        "--ca-file",
        envvar="TIERWRITER_CA_FILE",
        default="",
        show_envvar=True,
        help="Connect with TLS, trusting this CA certificate (PEM); unset: plaintext.",
    )
    @functools.wraps(command)
    def with_connection(
        user: str, password: str, address: str, ca_file: str, **options: Any
    ) -> int:
        return command(Connection(user, password, address, ca_file), **options)

    return with_connection


# --json: one JSON document (listings), or one JSON object per event, a line each (NDJSON).
json_option = click.option(
    "--json",
    "as_json_output",
    is_flag=True,
    help="Print JSON for scripts (field names as in the protos; see README).",
)


def utc(stamp: Timestamp) -> str:
    return stamp.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M UTC")
