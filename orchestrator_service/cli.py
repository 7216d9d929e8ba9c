"""The `tierwriter` command: a plain gRPC client of the orchestrator, plus `up` and `demo`."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import queue
import secrets
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC
from importlib import resources
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service import token_file
from orchestrator_service.client import EventStream, OrchestratorClient
from orchestrator_service.config import Settings
from orchestrator_service.console import (
    event_lines,
    format_cost,
    post_processing_lines,
)
from orchestrator_service.stack import LocalStack, StackConfig
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


def watch_and_print(client: OrchestratorClient, stream: EventStream, out: TextIO) -> int:
    """Print every event of the watched jobs as it arrives; return the exit code (the worst
    over the jobs). The first Ctrl-C cancels the watched jobs (queued ones at once, running
    ones cleanly) and waits for their summaries; a second leaves at once, and the cancelled
    jobs wind down on the server. Leaving any other way cancels nothing: the jobs run on.

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
    with stream:
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
                for line in event_lines(item):
                    print(line, file=out, flush=True)
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


def _username(args: argparse.Namespace) -> str:
    """-u, else $TIERWRITER_USER; empty when neither is given."""
    return args.user or os.environ.get("TIERWRITER_USER", "")


def _password(args: argparse.Namespace, username: str) -> str:
    """-p, else $TIERWRITER_PASSWORD, else a prompt on a terminal."""
    password = args.password or os.environ.get("TIERWRITER_PASSWORD", "")
    if not password and _interactive():
        password = getpass.getpass(f"Password for {username}: ")
    if not password:
        raise CliError(
            f"no password for {username!r}: set TIERWRITER_PASSWORD, pass -p, or run on a "
            "terminal to be asked",
            EXIT_UNAUTHENTICATED,
        )
    return password


def _root_certificates(args: argparse.Namespace) -> bytes | None:
    """The CA bundle to trust for TLS (--ca-file or $TIERWRITER_CA_FILE); None: plaintext."""
    ca_file = args.ca_file or os.environ.get("TIERWRITER_CA_FILE")
    if not ca_file:
        return None
    try:
        return Path(ca_file).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read CA file {ca_file}: {e.strerror}", EXIT_BAD_INPUT) from e


def _open_client(args: argparse.Namespace) -> OrchestratorClient:
    """A client with the caller's credentials: -u (or $TIERWRITER_USER) with a password, else
    the session saved by `tierwriter login`."""
    roots = _root_certificates(args)
    username = _username(args)
    if username:
        password = _password(args, username)
        return OrchestratorClient(args.address, username, password, root_certificates=roots)
    try:
        session = token_file.load(token_file.default_path(), args.address)
    except token_file.TokenFileError as e:
        raise CliError(str(e), EXIT_UNAUTHENTICATED) from e
    if session is None:
        raise CliError(
            "not logged in: run `tierwriter login`, or pass -u USER (or set TIERWRITER_USER "
            "and TIERWRITER_PASSWORD)",
            EXIT_UNAUTHENTICATED,
        )
    return OrchestratorClient(args.address, token=session.token, root_certificates=roots)


def cmd_generate_batch(args: argparse.Namespace) -> int:
    try:
        job_file = Path(args.job_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"Error: cannot read job file {args.job_file}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def submit(client: OrchestratorClient) -> int:
        job_ids = client.submit_job(job_file)
        if args.detach:
            listed = ", ".join(map(str, job_ids))
            print(f"Submitted: job{'s' if len(job_ids) > 1 else ''} {listed}")
            print(f"Watch with `tierwriter jobs watch {job_ids[0]}`; they run on the server.")
            return EXIT_OK
        return watch_and_print(client, client.watch_jobs(job_ids), sys.stdout)

    return _client_command(args, submit)


def _job_row(j: pb.JobInfo) -> str:
    created = j.create_time.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M")
    return (
        f"{j.job_id:>6}  {created}  {job_status_word(j.status):<10} {j.project[:24]:<24} "
        f"{j.generated_articles:>5} {j.augmented_articles:>5} {j.failed_articles:>5} "
        f"/{j.requested_articles:<5} w={j.max_workers}"
    )


def _client_command(args: argparse.Namespace, action: Callable[[OrchestratorClient], int]) -> int:
    """Run `action` with a client; a failed call prints its reason and gives its exit code."""
    with _open_client(args) as client:
        try:
            return action(client)
        except runtime.ServiceCallError as e:
            print(f"Error: {_error_text(e)}", file=sys.stderr)
            return _exit_code_for(e)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    def listing(client: OrchestratorClient) -> int:
        jobs = client.list_jobs(args.limit)
        print(
            f"{'ID':>6}  {'created (UTC)':<16}  {'status':<10} {'project':<24} {'gen':>5} "
            f"{'aug':>5} {'fail':>5} /total"
        )
        for j in jobs:
            print(_job_row(j))
        return EXIT_OK

    return _client_command(args, listing)


def cmd_jobs_show(args: argparse.Namespace) -> int:
    def show(client: OrchestratorClient) -> int:
        response = client.get_job(args.job_id)
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
        return EXIT_OK

    return _client_command(args, show)


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    def cancel(client: OrchestratorClient) -> int:
        print(client.cancel_job(args.job_id))
        return EXIT_OK

    return _client_command(args, cancel)


def cmd_jobs_resume(args: argparse.Namespace) -> int:
    def resume(client: OrchestratorClient) -> int:
        queued = client.resume_job(args.job_id, args.retry_failed, args.max_cost_usd or 0.0)
        if args.detach:
            print(f"Job {queued.job_id} is queued to resume; `tierwriter jobs watch "
                  f"{queued.job_id}` shows it.")  # fmt: skip
            return EXIT_OK
        return watch_and_print(
            client, client.watch_job(queued.job_id, queued.after_seq), sys.stdout
        )

    return _client_command(args, resume)


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    def watch(client: OrchestratorClient) -> int:
        return watch_and_print(client, client.watch_job(args.job_id, args.after), sys.stdout)

    return _client_command(args, watch)


def cmd_jobs_publish(args: argparse.Namespace) -> int:
    def publish(client: OrchestratorClient) -> int:
        steps = client.publish_job(args.job_id)
        for step in steps:
            for line in post_processing_lines(step):
                print(line)
        return EXIT_RUN_FAILED if any(step.error for step in steps) else EXIT_OK

    return _client_command(args, publish)


def _project_json(args: argparse.Namespace) -> str | None:
    if args.file:
        return Path(args.file).read_text(encoding="utf-8")
    if not args.name or not args.keyword:
        return None
    return json.dumps(
        {
            "name": args.name,
            "main_keyword": args.keyword,
            "entities": args.entity or [],
            "related_searches": args.related or [],
            "money_site_url": args.money_site_url or "",
        }
    )


def _print_project(p: pb.Project) -> None:
    print(f"Project {p.id}: {p.name}")
    print(f"  main keyword:     {p.main_keyword}")
    print(f"  entities:         {', '.join(p.entities) or '-'}")
    print(f"  related searches: {', '.join(p.related_searches) or '-'}")
    print(f"  money site:       {p.money_site_url or '-'}")


def cmd_projects_create(args: argparse.Namespace) -> int:
    try:
        project_json = _project_json(args)
    except (OSError, UnicodeDecodeError) as e:
        print(f"Error: cannot read project file {args.file}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if project_json is None:
        print("Error: give -f PROJECT_FILE, or --name and --keyword", file=sys.stderr)
        return EXIT_BAD_INPUT

    def create(client: OrchestratorClient) -> int:
        _print_project(client.create_project(project_json))
        return EXIT_OK

    return _client_command(args, create)


def cmd_projects_list(args: argparse.Namespace) -> int:
    def listing(client: OrchestratorClient) -> int:
        print(f"{'ID':>6}  {'name':<32} {'main keyword':<32} money site")
        for p in client.list_projects():
            print(f"{p.id:>6}  {p.name[:32]:<32} {p.main_keyword[:32]:<32} {p.money_site_url}")
        return EXIT_OK

    return _client_command(args, listing)


def cmd_projects_show(args: argparse.Namespace) -> int:
    def show(client: OrchestratorClient) -> int:
        ref = args.project
        project = (
            client.get_project(project_id=int(ref))
            if ref.isdigit()
            else client.get_project(name=ref)
        )
        _print_project(project)
        return EXIT_OK

    return _client_command(args, show)


def cmd_sites_list(args: argparse.Namespace) -> int:
    def listing(client: OrchestratorClient) -> int:
        print(f"{'hostname':<40} template set")
        for site in client.list_sites():
            print(f"{site.hostname:<40} {site.template or '(default)'}")
        return EXIT_OK

    return _client_command(args, listing)


def _utc(stamp: Timestamp) -> str:
    return stamp.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M UTC")


def cmd_login(args: argparse.Namespace) -> int:
    username = _username(args)
    if not username and _interactive():
        username = input("Username: ").strip()
    if not username:
        raise CliError("give a username: -u USER or $TIERWRITER_USER", EXIT_BAD_INPUT)
    password = _password(args, username)
    with OrchestratorClient(args.address, root_certificates=_root_certificates(args)) as client:
        try:
            response = client.login(username, password)
        except runtime.ServiceCallError as e:
            print(f"Error: {_error_text(e)}", file=sys.stderr)
            return _exit_code_for(e)
    path = token_file.default_path()
    token_file.save(
        token_file.SavedSession(
            args.address,
            response.user.username,
            response.token,
            response.expire_time.ToNanoseconds() / 1e9,
        ),
        path,
    )
    print(
        f"Logged in to {args.address} as {response.user.username} ({response.user.role}) until "
        f"{_utc(response.expire_time)}; the session is kept in {path}, readable only by you."
    )
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    path = token_file.default_path()
    print(f"Logged out: removed {path}." if token_file.delete(path) else "Not logged in.")
    return EXIT_OK


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


def cmd_users_create(args: argparse.Namespace) -> int:
    password = _new_password(args.username)

    def create(client: OrchestratorClient) -> int:
        user = client.create_user(args.username, password, args.role)
        print(f"Created user {user.username} ({user.role}).")
        return EXIT_OK

    return _client_command(args, create)


def cmd_users_list(args: argparse.Namespace) -> int:
    def listing(client: OrchestratorClient) -> int:
        print(f"{'username':<32} {'role':<6} {'state':<9} created")
        for user in client.list_users():
            print(_user_row(user))
        return EXIT_OK

    return _client_command(args, listing)


def cmd_users_set_active(args: argparse.Namespace) -> int:
    def set_active(client: OrchestratorClient) -> int:
        user = client.set_user_active(args.username, args.active)
        done = "enabled" if user.active else "disabled: it can no longer log in or use a token"
        print(f"User {user.username} is {done}.")
        return EXIT_OK

    return _client_command(args, set_active)


def cmd_users_passwd(args: argparse.Namespace) -> int:
    username = args.username or _username(args)
    if not username:
        try:
            saved = token_file.load(token_file.default_path(), args.address)
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

    return _client_command(args, passwd)


def cmd_up(args: argparse.Namespace) -> int:
    runtime.configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    # One process per service: the three use every core rather than one interpreter lock.
    with LocalStack(StackConfig(processes=True)) as stack:
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


def cmd_demo(args: argparse.Namespace) -> int:
    # The console lines tell the story; service logs would repeat them. Errors still show.
    runtime.configure_logging("ERROR")
    # A fresh database each run, so the demo never depends on (or touches) earlier state.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DEMO_DATABASE}{suffix}").unlink(missing_ok=True)
    password = secrets.token_urlsafe(16)
    simulator = SimulatorConfig(
        latency=args.latency,
        garbage_outline_every=args.fail_every,
        short_outline_every=args.repair_every,
        rate_limit_every=args.rate_limit_every,
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
    print(
        f"Database: {DEMO_DATABASE} (recreated each run); simulated latency {args.latency}s a call."
    )
    if args.fail_every:
        print(
            f"The simulator returns a malformed outline for every {args.fail_every}th "
            "outline request,"
            " to show a failure being recorded while the rest of the batch goes on."
        )
    if args.rate_limit_every:
        print(
            f"Every {args.rate_limit_every}th model call is refused with 429 and Retry-After, to "
            "show a retry."
        )
    if args.repair_every:
        print(
            f"Every {args.repair_every}th outline comes back with too few sections, to show the "
            "one repair request."
        )
    print()
    with (
        LocalStack(config) as stack,
        OrchestratorClient(stack.orchestrator_address, "admin", password) as client,
    ):
        return watch_and_print(client, client.run_job(demo_job()), sys.stdout)


def _positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: `tierwriter --help` lists the commands."""
    address_default = Settings().orchestrator_address
    parser = argparse.ArgumentParser(
        prog="tierwriter",
        description="Generate batches of long-form articles with an LLM, concurrently.",
        epilog="Credentials: `tierwriter login` once (the token is kept in "
        "TIERWRITER_TOKEN_FILE, default ~/.config/tierwriter/token.json), or -u/-p, or "
        "TIERWRITER_USER and TIERWRITER_PASSWORD; without a password on a terminal you are "
        "asked. Environment: ORCHESTRATOR_ADDRESS, TIERWRITER_CA_FILE; the services read "
        "CONCURRENT_WORKERS, WORD_COUNT_COMPENSATION, OPENAI_BASE_URL, OPENAI_API_KEY, "
        "DATABASE_URL, TLS_CERT_FILE, TLS_KEY_FILE (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_client_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-u", "--user", help="username (default: $TIERWRITER_USER, else the saved login)"
        )
        p.add_argument(
            "-p",
            "--password",
            help="password (default: $TIERWRITER_PASSWORD, else asked on a terminal; a "
            "password on the command line is visible to other local users)",
        )
        p.add_argument(
            "--address",
            default=address_default,
            help="orchestrator address (default: $ORCHESTRATOR_ADDRESS or %(default)s)",
        )
        p.add_argument(
            "--ca-file",
            help="connect with TLS, trusting this CA certificate (PEM) (default: "
            "$TIERWRITER_CA_FILE; unset: plaintext)",
        )
        return p

    login = with_client_options(
        commands.add_parser(
            "login",
            help="log in once: the session token is kept in a file only you can read and used "
            "by the other commands until it expires",
        )
    )
    login.set_defaults(handler=cmd_login)
    logout = commands.add_parser("logout", help="forget the saved session token")
    logout.set_defaults(handler=cmd_logout)

    batch = with_client_options(
        commands.add_parser(
            "generate-batch",
            help="submit a job file to a running tierwriter (see `up`) and watch its jobs; "
            "they run on the server whatever happens to this command (Ctrl-C cancels them)",
        )
    )
    batch.add_argument("-j", "--job-file", required=True, help="the job file (JSON)")
    batch.add_argument(
        "--detach",
        action="store_true",
        help="print the job ids and return at once; `tierwriter jobs watch ID` follows a job",
    )
    batch.set_defaults(handler=cmd_generate_batch)

    up = commands.add_parser(
        "up",
        help="start all services (and the simulator without an API key) "
        "on loopback in the foreground; Ctrl-C stops them",
    )
    up.set_defaults(handler=cmd_up)

    demo = commands.add_parser(
        "demo", help="run the bundled two-tier demo job end to end with no setup"
    )
    demo.add_argument(
        "--latency",
        type=float,
        default=0.3,
        help="simulated seconds per model call (default: %(default)s)",
    )
    demo.add_argument(
        "--fail-every",
        type=int,
        default=12,
        metavar="N",
        help="every N-th outline reply is malformed, to show failure handling; "
        "0 for none (default: %(default)s)",
    )
    demo.add_argument(
        "--repair-every",
        type=int,
        default=7,
        metavar="N",
        help="every N-th outline has too few sections and gets a repair request; "
        "0 for none (default: %(default)s)",
    )
    demo.add_argument(
        "--rate-limit-every",
        type=int,
        default=15,
        metavar="N",
        help="every N-th model call gets a 429 with Retry-After and is retried; "
        "0 for none (default: %(default)s)",
    )
    demo.set_defaults(handler=cmd_demo)

    jobs = commands.add_parser(
        "jobs", help="list, show, watch, cancel, resume or publish jobs"
    ).add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = with_client_options(jobs.add_parser("list", help="jobs, newest first"))
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=cmd_jobs_list)
    show = with_client_options(jobs.add_parser("show", help="one job with its per-tier counts"))
    show.add_argument("job_id", type=int)
    show.set_defaults(handler=cmd_jobs_show)
    cancel = with_client_options(
        jobs.add_parser(
            "cancel",
            help="cancel a queued or running job: nothing new starts, articles in flight finish "
            "(or stop after CANCEL_GRACE_SECONDS) and are recorded; the job ends cancelled",
        )
    )
    cancel.add_argument("job_id", type=int)
    cancel.set_defaults(handler=cmd_jobs_cancel)
    resume = with_client_options(
        jobs.add_parser(
            "resume",
            help="finish a failed, cancelled or interrupted job: only the articles without a "
            "record are generated (titles reused), then the whole job is post-processed",
        )
    )
    resume.add_argument("job_id", type=int)
    resume.add_argument(
        "--retry-failed", action="store_true", help="also generate the articles that failed"
    )
    resume.add_argument(
        "--max-cost-usd",
        type=_positive_float,
        metavar="USD",
        help="a new budget for the job (its articles skipped for the budget are written "
        "while it lasts)",
    )
    resume.add_argument("--detach", action="store_true", help="queue the resume and return at once")
    resume.set_defaults(handler=cmd_jobs_resume)
    watch = with_client_options(
        jobs.add_parser(
            "watch",
            help="follow a job's events (all of them, from its start) until it ends; "
            "Ctrl-C cancels it, a second Ctrl-C leaves at once",
        )
    )
    watch.add_argument("job_id", type=int)
    watch.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="SEQ",
        help="only events after this sequence number (default: from the job's start)",
    )
    watch.set_defaults(handler=cmd_jobs_watch)
    republish = with_client_options(
        jobs.add_parser(
            "publish",
            help="run a finished job's post-processing again (URLs kept; links, pages and "
            "files remade), e.g. after changing a site template",
        )
    )
    republish.add_argument("job_id", type=int)
    republish.set_defaults(handler=cmd_jobs_publish)

    projects = commands.add_parser("projects", help="create, list or show projects")
    project_actions = projects.add_subparsers(
        dest="projects_command", required=True, metavar="ACTION"
    )
    create = with_client_options(
        project_actions.add_parser(
            "create", help="create a project from a project file or from flags"
        )
    )
    create.add_argument(
        "-f", "--file", help="project file: the job file's `project` object as JSON"
    )
    create.add_argument("--name", help="unique project name")
    create.add_argument("--keyword", help="main keyword")
    create.add_argument("--entity", action="append", help="an entity (repeat for more)")
    create.add_argument("--related", action="append", help="a related search (repeat for more)")
    create.add_argument("--money-site-url", help="the site tier-1 articles link to")
    create.set_defaults(handler=cmd_projects_create)
    project_list = with_client_options(project_actions.add_parser("list", help="projects"))
    project_list.set_defaults(handler=cmd_projects_list)
    project_show = with_client_options(project_actions.add_parser("show", help="one project"))
    project_show.add_argument("project", help="the project's id or name")
    project_show.set_defaults(handler=cmd_projects_show)

    sites = commands.add_parser("sites", help="list the sites jobs publish on")
    site_actions = sites.add_subparsers(dest="sites_command", required=True, metavar="ACTION")
    site_list = with_client_options(
        site_actions.add_parser("list", help="sites with their template sets")
    )
    site_list.set_defaults(handler=cmd_sites_list)

    users = commands.add_parser(
        "users", help="create, list, disable, enable users, or set a password (admins)"
    )
    user_actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    user_create = with_client_options(
        user_actions.add_parser(
            "create",
            help="create a user; the password is asked twice on a terminal, else read from "
            "the first line of standard input",
        )
    )
    user_create.add_argument("username")
    user_create.add_argument("--role", choices=["user", "admin"], default="user")
    user_create.set_defaults(handler=cmd_users_create)
    user_list = with_client_options(user_actions.add_parser("list", help="every user"))
    user_list.set_defaults(handler=cmd_users_list)
    user_disable = with_client_options(
        user_actions.add_parser(
            "disable", help="disable a user: no login, and their tokens stop working at once"
        )
    )
    user_disable.add_argument("username")
    user_disable.set_defaults(handler=cmd_users_set_active, active=False)
    user_enable = with_client_options(
        user_actions.add_parser("enable", help="enable a disabled user again")
    )
    user_enable.add_argument("username")
    user_enable.set_defaults(handler=cmd_users_set_active, active=True)
    user_passwd = with_client_options(
        user_actions.add_parser(
            "passwd",
            help="set a password (yours by default; an admin may set anyone's); asked twice "
            "on a terminal, else read from standard input",
        )
    )
    user_passwd.add_argument("username", nargs="?")
    user_passwd.set_defaults(handler=cmd_users_passwd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tierwriter` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
