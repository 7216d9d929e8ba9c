"""OrchestratorServicer: authorises and translates. Who calls, and which status code an error
means, are settled around it by the interceptors (interceptors.py)."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator_service import export
from orchestrator_service.auth import Authenticator, Principal
from orchestrator_service.events import watch
from orchestrator_service.interceptors import caller as current_caller
from orchestrator_service.interceptors import recheck_caller
from orchestrator_service.jobfile import parse_project_file
from orchestrator_service.postprocess import LeaseLostError, stored_files
from orchestrator_service.runner import JobRunner
from orchestrator_service.scheduler import JobScheduler
from orchestrator_service.tier_group import tier_finished
from persistence_service.client import PersistenceClient
from tierwriter import runtime
from tierwriter.article.v1.article_event_pb2 import ArticleStatus
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError
from tierwriter.statuses import ACTIVE_JOB_STATUSES, job_status_word

log = logging.getLogger(__name__)
MAX_LIST_LIMIT = 1000
MAX_REQUEST_ID_CHARS = 100  # SubmitJob's request_id: a UUID and then some
# GetJob with errors: the first failures, tracebacks and all, well within a message's 16 MiB.
MAX_FAILURES_SHOWN = 500


class _Owned(Protocol):
    owner: str


Record = TypeVar("Record", bound=_Owned)


def _owned(
    context: grpc.ServicerContext, caller: Principal, fetch: Callable[[], Record], denied: str
) -> Record:
    """The record `fetch` returns, if the caller may see it. To a user, someone else's record
    and one that does not exist get the same PERMISSION_DENIED `denied`: the answer does not
    tell them apart. An admin is told NOT_FOUND."""
    record: Record | None = None
    try:
        record = fetch()
    except ServiceCallError as e:
        if e.code != grpc.StatusCode.NOT_FOUND or caller.is_admin:
            raise
    if record is None or not caller.owns(record.owner):
        runtime.abort(context, grpc.StatusCode.PERMISSION_DENIED, denied)
    return record


def project_to_public(p: db_pb.Project) -> pb.Project:
    """A stored project as the public message (the fields are the same)."""
    return pb.Project(
        id=p.id,
        name=p.name,
        main_keyword=p.main_keyword,
        entities=p.entities,
        related_searches=p.related_searches,
        money_site_url=p.money_site_url,
        owner=p.owner,
    )


def site_to_public(s: db_pb.Site) -> pb.Site:
    """A stored site as the public API shows it (without its database id)."""
    return pb.Site(hostname=s.hostname, template=s.template, owner=s.owner)


def user_to_public(u: db_pb.User) -> pb.User:
    """A stored user as the public message."""
    return pb.User(
        username=u.username, role=u.role, active=u.active, create_time=_set(u, "create_time")
    )


def _set(message: Any, field: str) -> Any:
    """A message field's value, or None when it is unset (so a copy leaves it unset too)."""
    return getattr(message, field) if message.HasField(field) else None


def timestamp(seconds: float) -> Timestamp | None:
    """Seconds since the epoch as a Timestamp; None (the field stays unset) for 0."""
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


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
        create_time=_set(job, "create_time"),
        finish_time=_set(job, "finish_time"),
        api_calls=title_calls,
        tokens=title_tokens,
        owner=job.owner,
        max_cost_usd=job.spec.max_cost_usd,
        runner=job.lease_owner if job.status == JobStatus.JOB_STATUS_RUNNING else "",
    )
    articles_cost = 0.0
    for t in tiers:
        info.generated_articles += t.counts.generated
        info.augmented_articles += t.counts.augmented
        info.failed_articles += t.counts.failed
        info.short_articles += t.counts.short
        info.long_articles += t.counts.long
        info.skipped_articles += t.counts.skipped
        articles_cost += t.counts.cost_usd
        info.api_calls += t.counts.api_calls
        info.tokens += t.counts.prompt_tokens + t.counts.completion_tokens
    # Summed in the summary's order (the tiers, then the titles): floats added in another order
    # can differ in the last digit, and the two must be the same number.
    info.cost_usd = articles_cost + job.title_cost_usd
    return info


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    """The public API. Every method but Login runs for an authenticated caller
    (current_caller()) and first checks what that caller may touch."""

    def __init__(
        self,
        runner: JobRunner,
        scheduler: JobScheduler,
        persistence: PersistenceClient,
        authenticator: Authenticator,
        max_watches: int,
    ) -> None:
        self._runner = runner
        self._scheduler = scheduler
        self._persistence = persistence
        self._auth = authenticator
        self._max_watches = max_watches
        self._watch_slots = threading.BoundedSemaphore(max_watches)
        self._stopping = threading.Event()  # ends every watch stream

    def stop_watches(self) -> None:
        """End every open watch stream (the server is stopping)."""
        self._stopping.set()

    def _job(self, context: grpc.ServicerContext, caller: Principal, job_id: int) -> db_pb.Job:
        """The job, if the caller may see it (see _owned)."""
        if job_id <= 0:
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "job_id: must be positive")
        return _owned(
            context,
            caller,
            lambda: self._persistence.get_job(job_id),
            f"job {job_id} is not one of your jobs: you can see and act on your own jobs only",
        )

    def _require_sites_owned(self, context: grpc.ServicerContext, job: db_pb.Job) -> None:
        try:
            self._runner.check_sites_still_owned(job)
        except ValueError as e:
            runtime.abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))

    @staticmethod
    def _require_admin(context: grpc.ServicerContext, caller: Principal) -> None:
        if not caller.is_admin:
            runtime.abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "only an admin can manage users"
            )

    def Login(self, request: pb.LoginRequest, context: grpc.ServicerContext) -> pb.LoginResponse:
        if not request.username or not request.password:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "username and password: both required"
            )
        address = self._auth.address(context.peer(), context.invocation_metadata())
        token, expires_at, user = self._auth.login(request.username, request.password, address)
        return pb.LoginResponse(
            token=token, expire_time=timestamp(expires_at), user=user_to_public(user)
        )

    def Logout(self, request: pb.LogoutRequest, context: grpc.ServicerContext) -> pb.LogoutResponse:
        metadata = context.invocation_metadata()
        try:
            username = self._auth.logout(metadata, self._auth.address(context.peer(), metadata))
        except ValueError as e:
            runtime.abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.LogoutResponse(username=username)

    def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobResponse:
        caller = current_caller()
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id: at most {MAX_REQUEST_ID_CHARS} characters",
            )
        job_file = self._runner.validate(request.job_file, caller)
        job_ids = self._runner.submit(job_file, caller, request.request_id)
        self._scheduler.wake()
        return pb.SubmitJobResponse(job_ids=job_ids)

    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchJobResponse]:
        job = self._job(context, current_caller(), request.job_id)
        if request.after_seq < 0:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "after_seq: must not be negative"
            )
        # Streams have threads of their own (ORCHESTRATOR_MAX_WATCHES); refusing one more keeps
        # the threads for short calls free, whatever the watchers do.
        if not self._watch_slots.acquire(blocking=False):
            runtime.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_watches} job watches are open on this orchestrator; try again "
                "later (the job runs on meanwhile)",
            )

        def active() -> bool:
            # Asked while the watch waits too, so a quiet job's watch also ends (raising
            # NotAuthenticatedError) once its caller's credentials lapse.
            recheck_caller()
            return context.is_active() and not self._stopping.is_set()

        try:
            for event in watch(
                job.id,
                request.after_seq,
                self._persistence,
                self._runner.local_log,
                active,
            ):
                yield pb.WatchJobResponse(event=event)
        finally:
            self._watch_slots.release()

    def ResumeJob(
        self, request: pb.ResumeJobRequest, context: grpc.ServicerContext
    ) -> pb.ResumeJobResponse:
        job = self._job(context, current_caller(), request.job_id)
        if request.max_cost_usd < 0:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "max_cost_usd: must not be negative"
            )
        self._require_sites_owned(context, job)
        # FAILED_PRECONDITION if it is queued or running; a new budget is kept in its spec.
        job = self._persistence.reopen_job(job.id, request.max_cost_usd, request.retry_failed)
        self._scheduler.wake()
        return pb.ResumeJobResponse(job_id=job.id, after_seq=job.last_event_seq)

    def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.ServicerContext
    ) -> pb.CancelJobResponse:
        caller = current_caller()
        job = self._job(context, caller, request.job_id)
        reason = f"cancelled by {caller.username}"
        if not self._runner.cancel(job.id, reason):
            # Queued (cancelled now), or running on another orchestrator (told to stop).
            job = self._persistence.request_cancel(job.id, reason)
            if job.status == JobStatus.JOB_STATUS_CANCELLED:
                return pb.CancelJobResponse(message=f"job {job.id} was queued: cancelled")
        return pb.CancelJobResponse(
            message=f"job {job.id} is being cancelled: no new article starts; those "
            "in flight finish (or stop after the grace period) and are recorded"
        )

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        job = self._job(context, current_caller(), request.job_id)
        stats = self._persistence.job_stats([job.id])
        project = self._persistence.get_project(job.project_id).name
        info = job_info(
            job,
            project,
            list(stats.tiers),
            stats.title_api_calls,
            stats.title_prompt_tokens + stats.title_completion_tokens,
        )
        tiers = [tier_finished(job.id, t) for t in stats.tiers]
        failures = []
        if request.errors:  # the caller owns the job (or is an admin): _job checked
            failed = self._persistence.list_articles(
                job.id, status=ArticleStatus.ARTICLE_STATUS_FAILED
            )
            failures = [
                pb.FailedArticle(
                    tier=a.tier,
                    article_index=a.article_index,
                    title=a.title,
                    stage=a.error_stage,
                    error=a.error,
                    traceback=a.error_traceback,
                    article_id=a.id,
                )
                for a in failed[:MAX_FAILURES_SHOWN]
            ]
        return pb.GetJobResponse(job=info, tiers=tiers, failures=failures)

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        caller = current_caller()
        if not 0 <= request.limit <= MAX_LIST_LIMIT:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit: must be 1 to {MAX_LIST_LIMIT} (0 means 50)",
            )
        jobs = self._persistence.list_jobs(request.limit or 50, caller.scope)
        if not jobs:
            return pb.ListJobsResponse()
        stats = self._persistence.job_stats([j.id for j in jobs])
        names = {
            pid: self._persistence.get_project(pid).name for pid in {j.project_id for j in jobs}
        }
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
        job = self._job(context, current_caller(), request.job_id)
        if job.status in ACTIVE_JOB_STATUSES:
            runtime.abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.id} is still {job_status_word(job.status)}: it is published when its "
                "articles are done",
            )
        self._require_sites_owned(context, job)
        # A new lease epoch: a publication of the job still going elsewhere writes nothing more.
        job = self._persistence.begin_publication(job.id)
        try:
            steps = list(self._runner.publisher.publish(job.id, job.lease_epoch))
        except LeaseLostError:
            runtime.abort(
                context,
                grpc.StatusCode.ABORTED,
                f"job {job.id}: another publication of it began meanwhile (or it was resumed); "
                "its files are that one's",
            )
        return pb.PublishJobResponse(steps=steps)

    def ExportJob(
        self, request: pb.ExportJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExportJobResponse]:
        job = self._job(context, current_caller(), request.job_id)
        if job.status in ACTIVE_JOB_STATUSES:
            runtime.abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.id} is still {job_status_word(job.status)}: export it once it ends",
            )
        # The database holds what was published, whichever orchestrator published it.
        files = stored_files(self._persistence, job.id)
        first = next(files, None)
        if first is None:
            runtime.abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"job {job.id} has no published files: `tierwriter jobs publish {job.id}` "
                "writes them",
            )
        # An export is a stream too: it takes a watch's slot, so the short calls keep threads.
        if not self._watch_slots.acquire(blocking=False):
            runtime.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_watches} job watches and exports are open on this orchestrator; "
                "try again later",
            )
        try:
            yield from export.file_chunks(itertools.chain([first], files))
        finally:
            self._watch_slots.release()

    def CreateProject(
        self, request: pb.CreateProjectRequest, context: grpc.ServicerContext
    ) -> pb.CreateProjectResponse:
        caller = current_caller()
        spec = parse_project_file(request.project_json)
        project = self._persistence.create_project(
            db_pb.Project(**spec.model_dump(), owner=caller.username)
        )
        return pb.CreateProjectResponse(project=project_to_public(project))

    def GetProject(
        self, request: pb.GetProjectRequest, context: grpc.ServicerContext
    ) -> pb.GetProjectResponse:
        caller = current_caller()
        if request.project_id < 0 or (not request.project_id and not request.name):
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "give a project id or a project name"
            )
        if request.project_id:
            project = _owned(
                context,
                caller,
                lambda: self._persistence.get_project(request.project_id),
                f"project {request.project_id} is not one of your projects",
            )
            return pb.GetProjectResponse(project=project_to_public(project))
        # By name it is looked up among the caller's own: NOT_FOUND tells nothing of others.
        project = self._persistence.get_project(name=request.name, owner=caller.username)
        return pb.GetProjectResponse(project=project_to_public(project))

    def ListProjects(
        self, request: pb.ListProjectsRequest, context: grpc.ServicerContext
    ) -> pb.ListProjectsResponse:
        caller = current_caller()
        projects = self._persistence.list_projects(caller.scope)
        return pb.ListProjectsResponse(projects=[project_to_public(p) for p in projects])

    def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.ServicerContext
    ) -> pb.ListSitesResponse:
        caller = current_caller()
        sites = self._persistence.list_sites(caller.scope)
        return pb.ListSitesResponse(sites=[site_to_public(s) for s in sites])

    def TransferSite(
        self, request: pb.TransferSiteRequest, context: grpc.ServicerContext
    ) -> pb.TransferSiteResponse:
        caller = current_caller()
        if not caller.is_admin:
            runtime.abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "only an admin can transfer a site"
            )
        if not request.hostname or not request.new_owner:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "hostname and new_owner: both required"
            )
        site = self._persistence.set_site_owner(request.hostname, request.new_owner)
        log.info("%r gave site %s to %r", caller.username, site.hostname, site.owner)
        return pb.TransferSiteResponse(site=site_to_public(site))

    def CreateUser(
        self, request: pb.CreateUserRequest, context: grpc.ServicerContext
    ) -> pb.CreateUserResponse:
        caller = current_caller()
        self._require_admin(context, caller)
        user = self._persistence.create_user(
            request.username, request.password, request.role or "user"
        )
        log.info("%r created user %r (%s)", caller.username, user.username, user.role)
        return pb.CreateUserResponse(user=user_to_public(user))

    def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.ServicerContext
    ) -> pb.ListUsersResponse:
        self._require_admin(context, current_caller())
        users = self._persistence.list_users()
        return pb.ListUsersResponse(users=[user_to_public(u) for u in users])

    def SetUserActive(
        self, request: pb.SetUserActiveRequest, context: grpc.ServicerContext
    ) -> pb.SetUserActiveResponse:
        caller = current_caller()
        self._require_admin(context, caller)
        user = self._persistence.set_user_active(request.username, request.active)
        done = "enabled" if user.active else "disabled"
        log.info("%r %s user %r", caller.username, done, user.username)
        return pb.SetUserActiveResponse(user=user_to_public(user))

    def SetPassword(
        self, request: pb.SetPasswordRequest, context: grpc.ServicerContext
    ) -> pb.SetPasswordResponse:
        caller = current_caller()
        if not caller.is_admin and request.username != caller.username:
            runtime.abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "you can change your own password only; an admin can change anyone's",
            )
        user = self._persistence.set_password(request.username, request.password)
        log.info("%r set a new password for %r", caller.username, user.username)
        return pb.SetPasswordResponse(user=user_to_public(user))

    def GetQuota(
        self, request: pb.GetQuotaRequest, context: grpc.ServicerContext
    ) -> pb.GetQuotaResponse:
        caller = current_caller()
        username = "" if request.default_quota else request.username or caller.username
        if request.default_quota and request.username:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "username: leave it out with default_quota",
            )
        if username != caller.username and not caller.is_admin:
            runtime.abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "you can see your own quota only; an admin can see anyone's",
            )
        found = self._persistence.get_quota(username)
        return pb.GetQuotaResponse(
            quota=pb.Quota(
                max_active_articles=found.quota.max_active_articles,
                max_queued_jobs=found.quota.max_queued_jobs,
            ),
            own=found.own,
            active_articles=found.active_articles,
            queued_jobs=found.queued_jobs,
            username=username,
        )

    def SetQuota(
        self, request: pb.SetQuotaRequest, context: grpc.ServicerContext
    ) -> pb.SetQuotaResponse:
        caller = current_caller()
        if not caller.is_admin:
            runtime.abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "only an admin can set quotas"
            )
        if request.default_quota == bool(request.username):
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "username: name a user, or set default_quota (not both)",
            )
        q = request.quota
        if q.max_active_articles < 0 or q.max_queued_jobs < 0:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "quota: max_active_articles and max_queued_jobs must not be negative (0: no limit)",
            )
        quota = (
            None
            if request.clear
            else db_pb.Quota(
                max_active_articles=q.max_active_articles, max_queued_jobs=q.max_queued_jobs
            )
        )
        applied = self._persistence.set_quota(request.username, quota)
        log.info("%r set the quota of %r", caller.username, request.username or "(default)")
        return pb.SetQuotaResponse(
            quota=pb.Quota(
                max_active_articles=applied.max_active_articles,
                max_queued_jobs=applied.max_queued_jobs,
            )
        )
