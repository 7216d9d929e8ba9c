"""The `tierwriter` command (Click): a plain gRPC client of the orchestrator, plus `up` and
`demo`, which start the services in this process.

Click, not argparse: each option is declared on the command that handles it, with its
environment variable beside it, and shell completion comes with it. The client commands import
only the gRPC client and the protos: `up` and `demo` import the services (the openai SDK,
SQLAlchemy) when they run, so `tierwriter --help` or `jobs list` starts in a fraction of a
second (tests/unit/test_cli_imports.py keeps it so)."""

from __future__ import annotations

import functools
import getpass
import json
import os
import queue
import secrets
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC
from importlib import resources
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
    format_cost,
    post_processing_lines,
)
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.statuses import job_status_word

EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run stopped early or a service failed during it
EXIT_BAD_INPUT = 2  # a bad job file or bad arguments; nothing was written
EXIT_UNAUTHENTICATED = 3  # not logged in, wrong credentials, or not allowed to do that
EXIT_UNAVAILABLE = 4  # a service could not be reached
EXIT_BUSY = 5  # the orchestrator refused for now (too many watches, login brake): try later
EXIT_INTERRUPTED = 130

DEFAULT_ADDRESS = "127.0.0.1:50051"  # ORCHESTRATOR_ADDRESS's default, as the services have it
DEMO_DATABASE = Path("data/demo.db")
DEMO_OUTPUT = Path("output/demo")


def demo_job() -> str:
    """The bundled demo job file's text."""
    return resources.files("orchestrator_service").joinpath("jobs/demo.json").read_text("utf-8")


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


def _exit_code_for(error: runtime.ServiceCallError) -> int:
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


def _error_text(error: runtime.ServiceCallError) -> str:
    """What to print for a failed call: the server's words when they are meant for the user."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
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
    client: OrchestratorClient, stream: EventStream, out: TextIO, ndjson: bool = False
) -> int:
    """Print every event of the watched jobs as it arrives (as console lines, or with `ndjson`
    as one JSON object each); return the exit code (the worst over the jobs). The first Ctrl-C
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
    exit_code, cancelling = EXIT_OK, False
    with stream, event_view(out, ndjson) as show:
        reader.start()
        while True:
            try:
                item = received.get(timeout=0.2)
                if item is None:
                    break
                if isinstance(item, runtime.ServiceCallError):
                    print(f"Error: {_error_text(item)}", file=sys.stderr)
                    return _exit_code_for(item)
                kind = item.WhichOneof("event")
                if kind == "job_started" and len(position) > 1:  # "Job 2/3": the file's order
                    item.job_started.job_number = position.get(item.job_id, 0)
                    item.job_started.job_count = len(position)
                show(item)
                if kind == "run_finished":
                    finished.add(item.job_id)
                    if not item.run_finished.ok:
                        exit_code = EXIT_RUN_FAILED
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if cancelling:
                    print(
                        "\nLeft at once: the jobs are cancelled on the server; in-flight "
                        "articles are still recorded.",
                        file=sys.stderr,
                    )
                    return EXIT_INTERRUPTED
                cancelling = True
                _cancel(client, [j for j in stream.job_ids if j not in finished])
    if cancelling:
        return EXIT_INTERRUPTED
    if len(finished) < len(stream.job_ids):
        # A job cancelled while queued never ran: its watch ends without a summary.
        return EXIT_RUN_FAILED
    return exit_code


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


def _interactive() -> bool:
    return sys.stdin.isatty()


@dataclass(frozen=True)
class Connection:
    """Where the orchestrator is and who calls it, from the options every client command has."""

    user: str  # -u, else $TIERWRITER_USER; "" for the saved login
    password: str  # -p, else $TIERWRITER_PASSWORD; "" to be asked
    address: str
    ca_file: str  # "" for plaintext

    def password_for(self, username: str) -> str:
        """The password given, else one asked for on a terminal."""
        password = self.password
        if not password and _interactive():
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
                print(f"Error: {_error_text(e)}", file=sys.stderr)
                return _exit_code_for(e)


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


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# --json: one JSON document (listings), or one JSON object per event, a line each (NDJSON).
json_option = click.option(
    "--json",
    "as_json_output",
    is_flag=True,
    help="Print JSON for scripts (field names as in the protos; see README).",
)


@click.group(
    context_settings=CONTEXT,
    epilog="Credentials: `tierwriter login` once (the token is kept in TIERWRITER_TOKEN_FILE, "
    "default ~/.config/tierwriter/token.json), or -u/-p, or TIERWRITER_USER and "
    "TIERWRITER_PASSWORD; without a password on a terminal you are asked. The services read "
    "CONCURRENT_WORKERS, WORD_COUNT_COMPENSATION, OPENAI_BASE_URL, OPENAI_API_KEY, "
    "DATABASE_URL, TLS_CERT_FILE, TLS_KEY_FILE (see README). Shell completion: "
    'eval "$(_TIERWRITER_COMPLETE=bash_source tierwriter)" (zsh_source, fish_source).',
)
def cli() -> None:
    """Generate batches of long-form articles with an LLM, concurrently.

    \b
    Start here:
      tierwriter demo                  the bundled job, end to end, no setup
      tierwriter up                    every service on loopback, in the foreground
      tierwriter login -u admin        then, from another shell:
      tierwriter generate-batch -j job.json
    """


@cli.command("generate-batch", context_settings=CONTEXT)
@click.option(
    "-j", "--job-file", required=True, type=click.Path(dir_okay=False), help="The job file (JSON)."
)
@click.option(
    "--detach",
    is_flag=True,
    help="Print the job ids and return at once; `tierwriter jobs watch ID` follows a job.",
)
@json_option
@connection_options
def generate_batch(
    connection: Connection, job_file: str, detach: bool, as_json_output: bool
) -> int:
    """Submit a job file and watch its jobs.

    The jobs run on the server whatever happens to this command; Ctrl-C cancels them (a second
    Ctrl-C leaves at once).

    \b
    Examples:
      tierwriter generate-batch -j jobs/cnc.json
      tierwriter generate-batch -j jobs/cnc.json --detach
      tierwriter generate-batch -j jobs/cnc.json --json | jq -c 'select(.run_finished)'
    """
    try:
        text = Path(job_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"Error: cannot read job file {job_file}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def submit(client: OrchestratorClient) -> int:
        job_ids = client.submit_job(text)
        if detach and as_json_output:
            print(as_json(pb.SubmitJobResponse(job_ids=job_ids)))
            return EXIT_OK
        if detach:
            listed = ", ".join(map(str, job_ids))
            print(f"Submitted: job{'s' if len(job_ids) > 1 else ''} {listed}")
            print(f"Watch with `tierwriter jobs watch {job_ids[0]}`; they run on the server.")
            return EXIT_OK
        return watch_and_print(client, client.watch_jobs(job_ids), sys.stdout, as_json_output)

    return connection.run(submit)


@cli.command(context_settings=CONTEXT)
def up() -> int:
    """Start every service on loopback, in the foreground.

    Without OPENAI_API_KEY the bundled LLM simulator stands in for the model. Ctrl-C stops
    every service.
    """
    from generator_service.config import Settings as GeneratorSettings
    from orchestrator_service.config import Settings
    from orchestrator_service.stack import LocalStack, StackConfig
    from persistence_service.config import Settings as PersistenceSettings
    from tierwriter import settings

    # Every service's settings, checked before any starts: one line naming each bad variable.
    try:
        for service_settings in (PersistenceSettings, GeneratorSettings, Settings):
            settings.load(service_settings)
    except settings.SettingsError as e:
        raise CliError(str(e), EXIT_BAD_INPUT) from None
    runtime.configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    # One process per service: the three use every core rather than one interpreter lock.
    with ExitStack() as running:
        try:
            stack = running.enter_context(LocalStack(StackConfig(processes=True)))
        except RuntimeError as e:  # a service exited before serving; its own lines are above
            raise CliError(str(e), EXIT_RUN_FAILED) from None
        if stack.admin_password_generated:
            print(
                f"Created user 'admin' with generated password: {stack.admin_password_generated}\n"
                "(shown once; set TIERWRITER_ADMIN_PASSWORD to choose it yourself)",
                flush=True,
            )
        certificate = Settings().tls_cert_file
        tls = f"TLS with {certificate}" if certificate else "plaintext: set TLS_CERT_FILE/_KEY_FILE"
        print(
            f"orchestrator  {stack.orchestrator_address} ({tls})\n"
            f"generator     {stack.generator_address}\n"
            f"persistence   {stack.persistence_address}\n"
            "Next: tierwriter login -u admin",
            flush=True,
        )
        if stack.simulator:
            print(f"LLM simulator {stack.simulator.base_url} (no OPENAI_API_KEY set)", flush=True)
        print("tierwriter is up. Ctrl-C stops every service.", flush=True)
        runtime.wait_for_stop_signal()
        print("Stopping: in-flight calls get a few seconds to finish...", flush=True)
    return EXIT_OK


@cli.command(context_settings=CONTEXT)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.3,
    show_default=True,
    help="Simulated seconds per model call.",
)
@click.option(
    "--fail-every",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    metavar="N",
    help="Every N-th outline reply is malformed, to show failure handling; 0 for none.",
)
@click.option(
    "--repair-every",
    type=click.IntRange(min=0),
    default=7,
    show_default=True,
    metavar="N",
    help="Every N-th outline has too few sections and gets a repair request; 0 for none.",
)
@click.option(
    "--rate-limit-every",
    type=click.IntRange(min=0),
    default=15,
    show_default=True,
    metavar="N",
    help="Every N-th model call gets a 429 with Retry-After and is retried; 0 for none.",
)
def demo(latency: float, fail_every: int, repair_every: int, rate_limit_every: int) -> int:
    """Run the bundled two-tier demo job end to end, with no setup.

    The three services and the LLM simulator run on loopback in this process; the database
    (data/demo.db) is made anew each run and the pages go to output/demo.

    \b
    Examples:
      tierwriter demo
      tierwriter demo --latency 0 --fail-every 0
    """
    from generator_service.llm.simulator import SimulatorConfig
    from orchestrator_service.stack import LocalStack, StackConfig

    # The console lines tell the story; service logs would repeat them. Errors still show.
    runtime.configure_logging("ERROR")
    # A fresh database each run, so the demo never depends on (or touches) earlier state.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DEMO_DATABASE}{suffix}").unlink(missing_ok=True)
    password = secrets.token_urlsafe(16)
    simulator = SimulatorConfig(
        latency=latency,
        garbage_outline_every=fail_every,
        short_outline_every=repair_every,
        rate_limit_every=rate_limit_every,
        rate_limit_retry_after_ms=500,
    )
    config = StackConfig.on_loopback(
        database_url=f"sqlite:///{DEMO_DATABASE}",
        output_dir=DEMO_OUTPUT,
        simulator=simulator,
        admin_password=password,
    )
    print(
        "tierwriter demo: the three services and the LLM simulator, on loopback, in this process."
    )
    print(f"Database: {DEMO_DATABASE} (recreated each run); simulated latency {latency}s a call.")
    if fail_every:
        print(
            f"The simulator returns a malformed outline for every {fail_every}th outline "
            "request, to show a failure being recorded while the rest of the batch goes on."
        )
    if rate_limit_every:
        print(
            f"Every {rate_limit_every}th model call is refused with 429 and Retry-After, to "
            "show a retry."
        )
    if repair_every:
        print(
            f"Every {repair_every}th outline comes back with too few sections, to show the "
            "one repair request."
        )
    print()
    with (
        LocalStack(config) as stack,
        OrchestratorClient(stack.orchestrator_address, "admin", password) as client,
    ):
        return watch_and_print(client, client.run_job(demo_job()), sys.stdout)


def _utc(stamp: Timestamp) -> str:
    return stamp.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M UTC")


@cli.command(context_settings=CONTEXT)
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
    if not username and _interactive():
        username = input("Username: ").strip()
    if not username:
        raise CliError("give a username: -u USER or $TIERWRITER_USER", EXIT_BAD_INPUT)
    password = connection.password_for(username)
    address = connection.address
    with OrchestratorClient(address, root_certificates=connection.root_certificates()) as client:
        try:
            response = client.login(username, password)
        except runtime.ServiceCallError as e:
            print(f"Error: {_error_text(e)}", file=sys.stderr)
            return _exit_code_for(e)
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
        f"{_utc(response.expire_time)}; the session is kept in {path}, readable only by you."
    )
    return EXIT_OK


@cli.command(context_settings=CONTEXT)
def logout() -> int:
    """Forget the saved session token."""
    path = token_file.default_path()
    print(f"Logged out: removed {path}." if token_file.delete(path) else "Not logged in.")
    return EXIT_OK


# jobs -----------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def jobs() -> None:
    """List, show, watch, cancel, resume or publish jobs."""


def _job_row(j: pb.JobInfo) -> str:
    created = j.create_time.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M")
    return (
        f"{j.job_id:>6}  {created}  {job_status_word(j.status):<10} {j.project[:24]:<24} "
        f"{j.generated_articles:>5} {j.augmented_articles:>5} {j.failed_articles:>5} "
        f"/{j.requested_articles:<5} w={j.max_workers}"
    )


@jobs.command("list", context_settings=CONTEXT)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Jobs to list."
)
@json_option
@connection_options
def jobs_list(connection: Connection, limit: int, as_json_output: bool) -> int:
    """Jobs, newest first (yours; an admin's: everyone's).

    \b
    Example:
      tierwriter jobs list --limit 10
    """

    def listing(client: OrchestratorClient) -> int:
        found = client.list_jobs(limit)
        if as_json_output:
            print(as_json(pb.ListJobsResponse(jobs=found)))
            return EXIT_OK
        print(
            f"{'ID':>6}  {'created (UTC)':<16}  {'status':<10} {'project':<24} {'gen':>5} "
            f"{'aug':>5} {'fail':>5} /total"
        )
        for j in found:
            print(_job_row(j))
        return EXIT_OK

    return connection.run(listing)


@jobs.command("show", context_settings=CONTEXT)
@click.argument("job_id", type=int)
@click.option(
    "--errors",
    is_flag=True,
    help="Also each failed article: its stage, error and the traceback where it was raised.",
)
@json_option
@connection_options
def jobs_show(connection: Connection, job_id: int, errors: bool, as_json_output: bool) -> int:
    """One job with its per-tier counts.

    \b
    Examples:
      tierwriter jobs show 12
      tierwriter jobs show 12 --errors
    """

    def show(client: OrchestratorClient) -> int:
        response = client.get_job(job_id, errors)
        if as_json_output:
            print(as_json(response))
            return EXIT_OK
        j = response.job
        print(
            f"Job {j.job_id}: project '{j.project}', status {job_status_word(j.status)}, "
            f"concurrency {j.max_workers}"
        )
        print(
            f"  articles: {j.generated_articles} generated, {j.augmented_articles} augmented, "
            f"{j.failed_articles} failed of {j.requested_articles} requested"
        )
        extra = [
            f"{n} {what}"
            for n, what in (
                (j.short_articles, "short"),
                (j.skipped_articles, "skipped for the budget"),
            )
            if n
        ]
        if extra:
            print(f"            {', '.join(extra)}")
        print(f"  API calls: {j.api_calls:,}; tokens: {j.tokens:,}")
        budget = f" of max_cost_usd ${j.max_cost_usd:g}" if j.max_cost_usd else ""
        print(f"  cost: {format_cost(j.cost_usd)}{budget}")
        for t in response.tiers:
            counts = f"{t.generated} generated, {t.augmented} augmented, {t.failed} failed"
            counts += f", {t.short} short" if t.short else ""
            counts += f", {t.skipped} skipped" if t.skipped else ""
            print(f"  {t.tier}: {counts}; {format_cost(t.cost_usd)}")
        if j.runner:
            print(f"  running on: {j.runner}")
        if j.error:
            print(f"  error: {j.error}")
        if errors:
            print(f"  failed articles: {len(response.failures) or 'none'}")
        for f in response.failures:
            record = f" (error record ID {f.article_id})" if f.article_id else ""
            print(f"\n[{f.tier}][{f.article_index + 1}] {f.title or '(no title)'}{record}")
            print(f"  FAILED at {f.stage}: {f.error}")
            for line in f.traceback.rstrip().splitlines():
                print(f"    {line}")
        return EXIT_OK

    return connection.run(show)


@jobs.command("cancel", context_settings=CONTEXT)
@click.argument("job_id", type=int)
@connection_options
def jobs_cancel(connection: Connection, job_id: int) -> int:
    """Cancel a queued or running job.

    Nothing new starts; articles in flight finish (or stop after CANCEL_GRACE_SECONDS) and are
    recorded; the job ends cancelled.
    """

    def cancel(client: OrchestratorClient) -> int:
        print(client.cancel_job(job_id))
        return EXIT_OK

    return connection.run(cancel)


@jobs.command("resume", context_settings=CONTEXT)
@click.argument("job_id", type=int)
@click.option("--retry-failed", is_flag=True, help="Also generate the articles that failed.")
@click.option(
    "--max-cost-usd",
    type=click.FloatRange(min=0, min_open=True),
    metavar="USD",
    help="A new budget for the job (its articles skipped for the budget are written while it "
    "lasts).",
)
@click.option("--detach", is_flag=True, help="Queue the resume and return at once.")
@json_option
@connection_options
def jobs_resume(
    connection: Connection,
    job_id: int,
    retry_failed: bool,
    max_cost_usd: float | None,
    detach: bool,
    as_json_output: bool,
) -> int:
    """Finish a failed, cancelled or interrupted job.

    Only the articles without a record are generated (titles reused), then the whole job is
    post-processed.

    \b
    Examples:
      tierwriter jobs resume 12
      tierwriter jobs resume 12 --retry-failed --max-cost-usd 5
    """

    def resume(client: OrchestratorClient) -> int:
        queued = client.resume_job(job_id, retry_failed, max_cost_usd or 0.0)
        if detach and as_json_output:
            print(as_json(queued))
            return EXIT_OK
        if detach:
            print(
                f"Job {queued.job_id} is queued to resume; `tierwriter jobs watch "
                f"{queued.job_id}` shows it."
            )
            return EXIT_OK
        return watch_and_print(
            client, client.watch_job(queued.job_id, queued.after_seq), sys.stdout, as_json_output
        )

    return connection.run(resume)


@jobs.command("watch", context_settings=CONTEXT)
@click.argument("job_id", type=int)
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=0,
    metavar="SEQ",
    help="Only events after this sequence number (default: from the job's start).",
)
@json_option
@connection_options
def jobs_watch(connection: Connection, job_id: int, after: int, as_json_output: bool) -> int:
    """Follow a job's events until it ends.

    Ctrl-C cancels the job, a second Ctrl-C leaves at once.

    \b
    Example:
      tierwriter jobs watch 12
      tierwriter jobs watch 12 --json > events.ndjson
    """
    return connection.run(
        lambda client: watch_and_print(
            client, client.watch_job(job_id, after), sys.stdout, as_json_output
        )
    )


@jobs.command("publish", context_settings=CONTEXT)
@click.argument("job_id", type=int)
@connection_options
def jobs_publish(connection: Connection, job_id: int) -> int:
    """Run a finished job's post-processing again.

    URLs are kept; links, pages and files are made anew, e.g. after changing a site template.
    """

    def publish(client: OrchestratorClient) -> int:
        steps = client.publish_job(job_id)
        for step in steps:
            for line in post_processing_lines(step):
                print(line)
        return EXIT_RUN_FAILED if any(step.error for step in steps) else EXIT_OK

    return connection.run(publish)


@jobs.command("export", context_settings=CONTEXT)
@click.argument("job_id", type=int)
@click.option(
    "-o",
    "--output",
    "output_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="The folder to write the job's files into (made if missing; files there are replaced).",
)
@connection_options
def jobs_export(connection: Connection, job_id: int, output_dir: str) -> int:
    """Download a finished job's files from the orchestrator.

    Its pages, site indexes, title lists and index.html, as post-processing wrote them under the
    orchestrator's OUTPUT_DIR, each checked against its SHA-256: for an orchestrator that runs
    elsewhere (docker-compose, a server). The pages link to each other relatively, so the folder
    can be browsed and uploaded as it is.

    \b
    Example:
      tierwriter jobs export 12 -o ./job-12 && open ./job-12/index.html
    """
    from orchestrator_service.export import ExportError, write_files

    root = Path(output_dir)

    def export(client: OrchestratorClient) -> int:
        try:
            written = write_files(client.export_job(job_id), root)
        except ExportError as e:
            print(f"Error: {e}", file=sys.stderr)
            return EXIT_RUN_FAILED
        except OSError as e:
            print(f"Error: cannot write the export under {root}: {e}", file=sys.stderr)
            return EXIT_RUN_FAILED
        total = sum(f.size for f in written)
        print(f"Exported job {job_id}: {len(written)} files, {total:,} bytes, under {root}/")
        index = root / "index.html"
        if index.is_file():
            print(f"Open {index} to browse the sites")
        return EXIT_OK

    return connection.run(export)


# projects and sites ---------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def projects() -> None:
    """Create, list or show projects."""


def _print_project(p: pb.Project, json_output: bool = False) -> None:
    if json_output:
        print(as_json(p))
        return
    print(f"Project {p.id}: {p.name}")
    print(f"  main keyword:     {p.main_keyword}")
    print(f"  entities:         {', '.join(p.entities) or '-'}")
    print(f"  related searches: {', '.join(p.related_searches) or '-'}")
    print(f"  money site:       {p.money_site_url or '-'}")


@projects.command("create", context_settings=CONTEXT)
@click.option(
    "-f",
    "--file",
    "project_file",
    type=click.Path(dir_okay=False),
    help="Project file: the job file's `project` object as JSON.",
)
@click.option("--name", default="", help="Unique project name.")
@click.option("--keyword", default="", help="Main keyword.")
@click.option("--entity", multiple=True, help="An entity (repeat for more).")
@click.option("--related", multiple=True, help="A related search (repeat for more).")
@click.option("--money-site-url", default="", help="The site tier-1 articles link to.")
@json_option
@connection_options
def projects_create(
    connection: Connection,
    project_file: str | None,
    name: str,
    keyword: str,
    entity: tuple[str, ...],
    related: tuple[str, ...],
    money_site_url: str,
    as_json_output: bool,
) -> int:
    """Create a project from a project file or from flags.

    \b
    Examples:
      tierwriter projects create --name lathes --keyword "cnc lathe" --entity chuck
      tierwriter projects create -f project.json
    """
    if project_file:
        try:
            project_json = Path(project_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            print(f"Error: cannot read project file {project_file}: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    elif name and keyword:
        project_json = json.dumps(
            {
                "name": name,
                "main_keyword": keyword,
                "entities": list(entity),
                "related_searches": list(related),
                "money_site_url": money_site_url,
            }
        )
    else:
        print("Error: give -f PROJECT_FILE, or --name and --keyword", file=sys.stderr)
        return EXIT_BAD_INPUT

    def create(client: OrchestratorClient) -> int:
        _print_project(client.create_project(project_json), as_json_output)
        return EXIT_OK

    return connection.run(create)


@projects.command("list", context_settings=CONTEXT)
@json_option
@connection_options
def projects_list(connection: Connection, as_json_output: bool) -> int:
    """Projects (yours; an admin's: everyone's)."""

    def listing(client: OrchestratorClient) -> int:
        found = client.list_projects()
        if as_json_output:
            print(as_json(pb.ListProjectsResponse(projects=found)))
            return EXIT_OK
        print(f"{'ID':>6}  {'name':<32} {'main keyword':<32} money site")
        for p in found:
            print(f"{p.id:>6}  {p.name[:32]:<32} {p.main_keyword[:32]:<32} {p.money_site_url}")
        return EXIT_OK

    return connection.run(listing)


@projects.command("show", context_settings=CONTEXT)
@click.argument("project")
@json_option
@connection_options
def projects_show(connection: Connection, project: str, as_json_output: bool) -> int:
    """One project, by id or name."""

    def show(client: OrchestratorClient) -> int:
        found = (
            client.get_project(project_id=int(project))
            if project.isdigit()
            else client.get_project(name=project)
        )
        _print_project(found, as_json_output)
        return EXIT_OK

    return connection.run(show)


@cli.group(context_settings=CONTEXT)
def sites() -> None:
    """List the sites jobs publish on."""


@sites.command("list", context_settings=CONTEXT)
@json_option
@connection_options
def sites_list(connection: Connection, as_json_output: bool) -> int:
    """Sites with their template sets."""

    def listing(client: OrchestratorClient) -> int:
        found = client.list_sites()
        if as_json_output:
            print(as_json(pb.ListSitesResponse(sites=found)))
            return EXIT_OK
        print(f"{'hostname':<40} template set")
        for site in found:
            print(f"{site.hostname:<40} {site.template or '(default)'}")
        return EXIT_OK

    return connection.run(listing)


# users ----------------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def users() -> None:
    """Create, list, disable, enable users, or set a password (admins)."""


def _new_password(username: str) -> str:
    """Asked twice on a terminal; otherwise the first line of standard input."""
    if _interactive():
        password = getpass.getpass(f"New password for {username}: ")
        if password != getpass.getpass("Again: "):
            raise CliError("the two passwords differ; nothing was changed", EXIT_BAD_INPUT)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("no new password given; nothing was changed", EXIT_BAD_INPUT)
    return password


def _user_row(u: pb.User) -> str:
    state = "active" if u.active else "disabled"
    return f"{u.username:<32} {u.role:<6} {state:<9} {_utc(u.create_time)}"


@users.command("create", context_settings=CONTEXT)
@click.argument("username")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@connection_options
def users_create(connection: Connection, username: str, role: str) -> int:
    """Create a user.

    The password is asked twice on a terminal, else read from the first line of standard input.

    \b
    Example:
      printf '%s\\n' "$PASSWORD" | tierwriter users create ann --role user
    """
    password = _new_password(username)

    def create(client: OrchestratorClient) -> int:
        user = client.create_user(username, password, role)
        print(f"Created user {user.username} ({user.role}).")
        return EXIT_OK

    return connection.run(create)


@users.command("list", context_settings=CONTEXT)
@json_option
@connection_options
def users_list(connection: Connection, as_json_output: bool) -> int:
    """Every user."""

    def listing(client: OrchestratorClient) -> int:
        found = client.list_users()
        if as_json_output:
            print(as_json(pb.ListUsersResponse(users=found)))
            return EXIT_OK
        print(f"{'username':<32} {'role':<6} {'state':<9} created")
        for user in found:
            print(_user_row(user))
        return EXIT_OK

    return connection.run(listing)


def _set_active(connection: Connection, username: str, active: bool) -> int:
    def set_active(client: OrchestratorClient) -> int:
        user = client.set_user_active(username, active)
        done = "enabled" if user.active else "disabled: it can no longer log in or use a token"
        print(f"User {user.username} is {done}.")
        return EXIT_OK

    return connection.run(set_active)


@users.command("disable", context_settings=CONTEXT)
@click.argument("username")
@connection_options
def users_disable(connection: Connection, username: str) -> int:
    """Disable a user: no login, and their tokens stop working at once."""
    return _set_active(connection, username, False)


@users.command("enable", context_settings=CONTEXT)
@click.argument("username")
@connection_options
def users_enable(connection: Connection, username: str) -> int:
    """Enable a disabled user again."""
    return _set_active(connection, username, True)


@users.command("passwd", context_settings=CONTEXT)
@click.argument("username", required=False, default="")
@connection_options
def users_passwd(connection: Connection, username: str) -> int:
    """Set a password: yours by default; an admin may set anyone's.

    Asked twice on a terminal, else read from standard input.
    """
    username = username or connection.user
    if not username:
        try:
            saved = token_file.load(token_file.default_path(), connection.address)
        except token_file.TokenFileError:
            saved = None
        username = saved.username if saved else ""
    if not username:
        raise CliError("name the user whose password to set", EXIT_BAD_INPUT)
    password = _new_password(username)

    def passwd(client: OrchestratorClient) -> int:
        user = client.set_password(username, password)
        print(
            f"New password set for {user.username}; session tokens issued before it no longer "
            "work (log in again with the new password)."
        )
        return EXIT_OK

    return connection.run(passwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tierwriter` console script; returns the exit code."""
    try:
        result = cli.main(args=argv, prog_name="tierwriter", standalone_mode=False)
    except click.UsageError as e:  # a bad option or argument: nothing was called
        e.show()
        return EXIT_BAD_INPUT
    except click.ClickException as e:
        e.show()
        return EXIT_BAD_INPUT
    except CliError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, click.Abort):
        return EXIT_INTERRUPTED
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
