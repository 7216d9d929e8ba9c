"""OrchestratorServicer: authenticates, translates, and maps errors onto status codes."""

from __future__ import annotations

import queue
from collections import defaultdict
from collections.abc import Iterator
from typing import NoReturn

import grpc

from orchestrator_service.auth import credentials_from_metadata
from orchestrator_service.jobfile import JobFileError, parse_project_file
from orchestrator_service.runner import CLIENT_GONE, Cancellation, JobRunner
from persistence_service.client import PersistenceClient
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError

# Codes of a dependency that a client of ours should see as they are; anything else means our
# dependency is in trouble, which to our client is UNAVAILABLE.
_PASSED_THROUGH = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def _abort_for(context: grpc.ServicerContext, error: ServiceCallError) -> NoReturn:
    if error.code in _PASSED_THROUGH:
        runtime.abort(context, error.code, error.details)  # type: ignore[arg-type]
    runtime.abort(context, grpc.StatusCode.UNAVAILABLE, str(error))


def project_to_public(p: db_pb.Project) -> pb.Project:
    """A stored project as the public message (the fields are the same)."""
    return pb.Project(
        id=p.id,
        name=p.name,
        main_keyword=p.main_keyword,
        entities=p.entities,
        related_searches=p.related_searches,
        money_site_url=p.money_site_url,
    )


def job_info(
    job: db_pb.Job, project: str, tiers: list[db_pb.TierStats], title_calls: int, title_tokens: int
) -> pb.JobInfo:
    """A stored job and its per-tier counts as the public JobInfo."""
    info = pb.JobInfo(
        job_id=job.id,
        project=project,
        status=job.status,
        max_workers=job.max_workers,
        requested_articles=job.requested_articles,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        api_calls=title_calls,
        tokens=title_tokens,
    )
    for t in tiers:
        info.generated_articles += t.counts.generated
        info.augmented_articles += t.counts.augmented
        info.failed_articles += t.counts.failed
        info.api_calls += t.counts.api_calls
        info.tokens += t.counts.prompt_tokens + t.counts.completion_tokens
    return info


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    """The public API. Every method first checks the caller's credentials."""

    def __init__(self, runner: JobRunner, persistence: PersistenceClient) -> None:
        self._runner = runner
        self._persistence = persistence

    def _authenticate(self, context: grpc.ServicerContext) -> db_pb.User:
        credentials = credentials_from_metadata(context.invocation_metadata())
        if credentials is None:
            runtime.abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "credentials required: pass -u/-p or set TIERWRITER_USER and TIERWRITER_PASSWORD",
            )
        try:
            user = self._persistence.verify_credentials(*credentials)
            # Before any job is started or shown: jobs a dead orchestrator left running.
            self._runner.recover_interrupted()
            return user
        except ServiceCallError as e:
            if e.code == grpc.StatusCode.UNAUTHENTICATED:
                runtime.abort(
                    context, grpc.StatusCode.UNAUTHENTICATED, "invalid username or password"
                )
            _abort_for(context, e)

    def RunJob(
        self, request: pb.RunJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        user = self._authenticate(context)
        try:
            job_file = self._runner.validate(request.job_file)
        except JobFileError as e:
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ServiceCallError as e:
            _abort_for(context, e)
        cancellation = Cancellation()
        yield from self._stream(
            context, self._runner.run(job_file, user.username, cancellation), cancellation
        )

    def ResumeJob(
        self, request: pb.ResumeJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        self._authenticate(context)
        cancellation = Cancellation()
        try:
            events = self._runner.resume(request.job_id, request.retry_failed, cancellation)
        except ServiceCallError as e:
            _abort_for(context, e)
        yield from self._stream(context, events, cancellation)

    def _stream(
        self,
        context: grpc.ServicerContext,
        events: Iterator[pb.JobEvent],
        cancellation: Cancellation,
    ) -> Iterator[pb.JobEvent]:
        """Run `events` on the runner's thread and pass them on; the client going away cancels
        (the callback also fires after the last event, harmlessly)."""
        context.add_callback(lambda: cancellation.cancel(CLIENT_GONE))
        queued: queue.Queue[pb.JobEvent | None] = queue.Queue()
        self._runner.launch(events, cancellation, queued.put)
        while (event := queued.get()) is not None:
            yield event

    def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.ServicerContext
    ) -> pb.CancelJobResponse:
        user = self._authenticate(context)
        if self._runner.cancel(request.job_id, f"cancelled by {user.username}"):
            return pb.CancelJobResponse(
                message=f"job {request.job_id} is being cancelled: no new article starts; those "
                "in flight finish (or stop after the grace period) and are recorded"
            )
        try:
            job = self._persistence.get_job(request.job_id)
        except ServiceCallError as e:
            _abort_for(context, e)
        runtime.abort(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            f"job {job.id} is not running here (status {job.status})",
        )

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        self._authenticate(context)
        try:
            job = self._persistence.get_job(request.job_id)
            stats = self._persistence.job_stats([job.id])
            project = self._persistence.get_project(job.project_id).name
        except ServiceCallError as e:
            _abort_for(context, e)
        info = job_info(
            job,
            project,
            list(stats.tiers),
            stats.title_api_calls,
            stats.title_prompt_tokens + stats.title_completion_tokens,
        )
        tiers = [
            pb.TierFinished(
                job_id=job.id,
                tier=t.tier,
                generated=t.counts.generated,
                augmented=t.counts.augmented,
                failed=t.counts.failed,
            )
            for t in stats.tiers
        ]
        return pb.GetJobResponse(job=info, tiers=tiers)

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        self._authenticate(context)
        try:
            jobs = self._persistence.list_jobs(request.limit or 50)
            if not jobs:
                return pb.ListJobsResponse()
            stats = self._persistence.job_stats([j.id for j in jobs])
            names = {
                pid: self._persistence.get_project(pid).name for pid in {j.project_id for j in jobs}
            }
        except ServiceCallError as e:
            _abort_for(context, e)
        tiers: dict[int, list[db_pb.TierStats]] = defaultdict(list)
        for t in stats.tiers:
            tiers[t.job_id].append(t)
        # Title costs are only reported in total by GetJobStats; per job they live on the job.
        return pb.ListJobsResponse(
            jobs=[
                job_info(
                    j,
                    names[j.project_id],
                    tiers[j.id],
                    j.title_api_calls,
                    j.title_prompt_tokens + j.title_completion_tokens,
                )
                for j in jobs
            ]
        )

    def PublishJob(
        self, request: pb.PublishJobRequest, context: grpc.ServicerContext
    ) -> pb.PublishJobResponse:
        self._authenticate(context)
        try:
            job = self._persistence.get_job(request.job_id)
            if job.status == "running":
                runtime.abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {job.id} is still running: it is published when its articles are done",
                )
            steps = list(self._runner.publisher.publish(job.id))
        except ServiceCallError as e:
            _abort_for(context, e)
        return pb.PublishJobResponse(steps=steps)

    def CreateProject(
        self, request: pb.CreateProjectRequest, context: grpc.ServicerContext
    ) -> pb.Project:
        self._authenticate(context)
        try:
            spec = parse_project_file(request.project_json)
        except JobFileError as e:
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            project = self._persistence.create_project(db_pb.Project(**spec.model_dump()))
        except ServiceCallError as e:
            _abort_for(context, e)
        return project_to_public(project)

    def GetProject(
        self, request: pb.GetProjectRequest, context: grpc.ServicerContext
    ) -> pb.Project:
        self._authenticate(context)
        if not request.project_id and not request.name:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "give a project id or a project name"
            )
        try:
            project = self._persistence.get_project(request.project_id, request.name)
        except ServiceCallError as e:
            _abort_for(context, e)
        return project_to_public(project)

    def ListProjects(
        self, request: pb.ListProjectsRequest, context: grpc.ServicerContext
    ) -> pb.ListProjectsResponse:
        self._authenticate(context)
        try:
            projects = self._persistence.list_projects()
        except ServiceCallError as e:
            _abort_for(context, e)
        return pb.ListProjectsResponse(projects=[project_to_public(p) for p in projects])

    def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.ServicerContext
    ) -> pb.ListSitesResponse:
        self._authenticate(context)
        try:
            sites = self._persistence.list_sites()
        except ServiceCallError as e:
            _abort_for(context, e)
        return pb.ListSitesResponse(
            sites=[pb.Site(hostname=s.hostname, template=s.template) for s in sites]
        )
