"""Commands that run the services in this process: `up` and `demo`."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import click

from orchestrator_service.cli.app import cli
from orchestrator_service.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RUN_FAILED,
    CliError,
    watch_and_print,
)
from orchestrator_service.client import OrchestratorClient
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

DEMO_DATABASE = Path("data/demo.db")
DEMO_OUTPUT = Path("output/demo")
OPENAI_API = "https://api.openai.com/v1"  # the openai SDK's endpoint without OPENAI_BASE_URL


def demo_job() -> str:
    """The bundled demo job file's text."""
    return resources.files("orchestrator_service").joinpath("jobs/demo.json").read_text("utf-8")


@cli.command()
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
    problems = []
    for service_settings in (PersistenceSettings, GeneratorSettings, Settings):
        try:
            settings.load(service_settings)
        except settings.BadSettingError as e:
            problems.append(str(e))
    if problems:
        raise CliError("; ".join(dict.fromkeys(problems)), EXIT_BAD_INPUT)
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
        model = GeneratorSettings()
        endpoint = (
            f"the bundled LLM simulator at {stack.simulator.base_url} (no OPENAI_API_KEY set)"
            if stack.simulator
            else model.openai_base_url or OPENAI_API
        )
        print(f"model         {model.default_model} at {endpoint}", flush=True)
        print("tierwriter is up. Ctrl-C stops every service.", flush=True)
        runtime.wait_for_stop_signal()
        print("Stopping: in-flight calls get a few seconds to finish...", flush=True)
    return EXIT_OK


@cli.command()
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
    (data/demo.db) is made anew each run and the pages go to output/demo. The article that
    --fail-every fails is the demo's own: the demo exits 0 with it, where a job exits 6;
    anything else missing (a short or long article, a title shortfall) exits 6 here too.

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
        # Exit 0 with the articles it fails on purpose, where a job would exit 6.
        return watch_and_print(
            client, client.run_job(demo_job()), sys.stdout, written=_as_designed(fail_every)
        )


def _as_designed(fail_every: int) -> Callable[[pb.Summary], bool]:
    """The demo's test of a finished run: every article written but those its simulator fails
    on purpose (at most one in `fail_every` outline requests, repairs counted), nothing short,
    long, skipped or untitled."""

    def written(s: pb.Summary) -> bool:
        on_purpose = s.requested_articles // fail_every if fail_every else 0
        return (
            s.generated_articles + s.augmented_articles + s.failed_articles == s.requested_articles
            and s.failed_articles <= on_purpose
        )

    return written
