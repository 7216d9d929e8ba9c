"""`generate-batch` and the `jobs` commands."""

from __future__ import annotations

import sys
from datetime import UTC
from pathlib import Path

import click

from orchestrator_service.cli.app import cli
from orchestrator_service.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RUN_FAILED,
    Connection,
    as_json,
    connection_options,
    json_option,
    watch_and_print,
)
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.console import (
    format_cost,
    post_processing_lines,
)
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.statuses import job_status_word


@cli.command("generate-batch")
@click.option(
    "-j", "--job-file", required=True, type=click.Path(dir_okay=False), help="The job file (JSON)."
)
@click.option(
    "--detach",
    is_flag=True,
    help="Print the job ids and return at once; `tierwriter jobs watch ID` follows a job.",
)
@click.option(
    "--request-id",
    default="",
    metavar="ID",
    help="Makes a retry safe: the same ID again (e.g. after a lost connection) submits nothing "
    "new and follows the jobs the first submit stored. Any string, e.g. a UUID.",
)
@json_option
@connection_options
def generate_batch(
    connection: Connection, job_file: str, detach: bool, request_id: str, as_json_output: bool
) -> int:
    """Submit a job file and watch its jobs.

    The jobs run on the server whatever happens to this command; Ctrl-C cancels them (a second
    Ctrl-C leaves at once).

    \b
    Examples:
      tierwriter generate-batch -j jobs/cnc.json
      tierwriter generate-batch -j jobs/cnc.json --detach
      tierwriter generate-batch -j jobs/cnc.json --request-id "$(uuidgen)"
      tierwriter generate-batch -j jobs/cnc.json --json | jq -c 'select(.run_finished)'
    """
    try:
        text = Path(job_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"Error: cannot read job file {job_file}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def submit(client: OrchestratorClient) -> int:
        job_ids = client.submit_job(text, request_id)
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


# jobs -----------------------------------------------------------------------------------------


@cli.group()
def jobs() -> None:
    """List, show, watch, cancel, resume or publish jobs."""


def _job_row(j: pb.JobInfo) -> str:
    created = j.create_time.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M")
    return (
        f"{j.job_id:>6}  {created}  {job_status_word(j.status):<10} {j.project[:24]:<24} "
        f"{j.generated_articles:>5} {j.augmented_articles:>5} {j.failed_articles:>5} "
        f"/{j.requested_articles:<5} w={j.max_workers}"
    )


@jobs.command("list")
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


@jobs.command("show")
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
                (j.long_articles, "long"),
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
            counts += f", {t.long} long" if t.long else ""
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


@jobs.command("cancel")
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


@jobs.command("resume")
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


@jobs.command("watch")
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


@jobs.command("publish")
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


@jobs.command("export")
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
