"""PersistenceClient: how the other services call persistence; every call has a deadline."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from tierwriter import runtime
from tierwriter.article.v1.article_event_pb2 import ArticleStatus
from tierwriter.persistence.v1 import persistence_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2_grpc as pb_grpc
from tierwriter.service_auth import token_metadata
from tierwriter.statuses import JobStatusValue

log = logging.getLogger(__name__)
R = TypeVar("R")
# Argon2 verification and a job's stats are the slowest calls; neither takes near this long.
DEFAULT_DEADLINE = 30.0


def _unavailable(error: BaseException) -> bool:
    return isinstance(error, runtime.ServiceCallError) and error.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def outline_to_proto(outline: list[dict[str, Any]] | None) -> pb.Outline | None:
    """A stored outline ([{"h2": …, "h3": […]}, …]) as its message; None stays unset."""
    if outline is None:
        return None
    return pb.Outline(sections=[pb.OutlineSection(h2=s["h2"], h3=s.get("h3", [])) for s in outline])


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("persistence call failed (%s); trying again", error)


class PersistenceClient:
    """A channel to persistence_service and one method per RPC it is used for. With
    `retry_seconds`, a call that finds persistence or its database down (UNAVAILABLE, or the
    deadline passed) is tried again with backoff for that long in all: every call is safe to
    repeat (reads, upserts by key, and request ids on the two that add). Without
    `wait_for_ready`, a call to a persistence that is down fails at once."""

    def __init__(
        self,
        address: str,
        deadline: float = DEFAULT_DEADLINE,
        service_token: str | None = None,
        retry_seconds: float = 0.0,
        wait_for_ready: bool = True,
    ) -> None:
        self.address = address
        self._deadline = deadline
        self._wait_for_ready = wait_for_ready
        self._metadata = token_metadata(service_token)
        self._channel = runtime.open_channel(address)
        self._stub = pb_grpc.PersistenceServiceStub(self._channel)
        self._retrying = Retrying(
            stop=stop_after_delay(retry_seconds),
            wait=wait_exponential(multiplier=0.5, max=5),
            retry=retry_if_exception(_unavailable),
            before_sleep=_log_retry,
            reraise=True,
        )

    def _call(self, rpc: Callable[..., R], request: Any) -> R:
        return self._retrying.copy()(self._call_once, rpc, request)  # a copy per call: threads

    def _call_once(self, rpc: Callable[..., R], request: Any) -> R:
        # wait_for_ready (unless turned off): a call made while persistence restarts waits for
        # it (up to the deadline) instead of failing at once.
        try:
            return rpc(
                request,
                timeout=self._deadline,
                wait_for_ready=self._wait_for_ready,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise runtime.ServiceCallError("persistence_service", self.address, e) from e

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> PersistenceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def ensure_project(self, project: pb.Project) -> pb.Project:
        return self._call(
            self._stub.EnsureProject, pb.EnsureProjectRequest(project=project)
        ).project

    def create_project(self, project: pb.Project) -> pb.Project:
        return self._call(
            self._stub.CreateProject, pb.CreateProjectRequest(project=project)
        ).project

    def get_project(self, project_id: int = 0, name: str = "", owner: str = "") -> pb.Project:
        request = pb.GetProjectRequest(project_id=project_id, name=name, owner=owner)
        return self._call(self._stub.GetProject, request).project

    def list_projects(self, owner: str = "") -> list[pb.Project]:
        request = pb.ListProjectsRequest(owner=owner)
        return list(self._call(self._stub.ListProjects, request).projects)

    def project_titles(self, project_id: int, exclude_job_id: int = 0) -> list[str]:
        request = pb.ListProjectTitlesRequest(project_id=project_id, exclude_job_id=exclude_job_id)
        return list(self._call(self._stub.ListProjectTitles, request).titles)

    def ensure_sites(
        self, sites: list[pb.Site], owner: str, any_owner: bool = False
    ) -> list[pb.Site]:
        request = pb.EnsureSitesRequest(sites=sites, owner=owner, any_owner=any_owner)
        return list(self._call(self._stub.EnsureSites, request).sites)

    def list_sites(self, owner: str = "", hostnames: Sequence[str] = ()) -> list[pb.Site]:
        request = pb.ListSitesRequest(owner=owner, hostnames=hostnames)
        return list(self._call(self._stub.ListSites, request).sites)

    def set_site_owner(self, hostname: str, owner: str) -> pb.Site:
        request = pb.SetSiteOwnerRequest(hostname=hostname, owner=owner)
        return self._call(self._stub.SetSiteOwner, request).site

    def create_job(self, request: pb.CreateJobRequest) -> pb.Job:
        """A queued job; the request gets an id (unless it has one), so a retry makes no
        second job."""
        request.request_id = request.request_id or uuid.uuid4().hex
        return self._call(self._stub.CreateJob, request).job

    def record_titles(self, request: pb.RecordTitlesRequest) -> pb.Job:
        """Record a tier's titles; a retry adds their cost once (see create_job)."""
        request.request_id = request.request_id or uuid.uuid4().hex
        return self._call(self._stub.RecordTitles, request).job

    def submit_jobs(self, request: pb.SubmitJobsRequest) -> list[pb.Job]:
        """A job file's sites, projects and jobs in one transaction; the request gets an id
        (unless it has one), so a retry stores nothing twice."""
        request.request_id = request.request_id or uuid.uuid4().hex
        return list(self._call(self._stub.SubmitJobs, request).jobs)

    def set_quota(self, username: str, quota: pb.Quota | None) -> pb.Quota:
        """Set a user's quota ("": the default); None removes the user's own."""
        request = pb.SetQuotaRequest(username=username, quota=quota, clear=quota is None)
        return self._call(self._stub.SetQuota, request).quota

    def get_quota(self, username: str) -> pb.GetQuotaResponse:
        return self._call(self._stub.GetQuota, pb.GetQuotaRequest(username=username))

    def finish_job(
        self, job_id: int, status: JobStatusValue, error: str = "", lease_epoch: int = 0
    ) -> pb.Job:
        request = pb.FinishJobRequest(
            job_id=job_id, status=status, error=error, lease_epoch=lease_epoch
        )
        return self._call(self._stub.FinishJob, request).job

    def reopen_job(
        self, job_id: int, max_cost_usd: float = 0.0, retry_failed: bool = False
    ) -> pb.Job:
        request = pb.ReopenJobRequest(
            job_id=job_id, max_cost_usd=max_cost_usd, retry_failed=retry_failed
        )
        return self._call(self._stub.ReopenJob, request).job

    def claim_jobs(
        self, owner: str, lease_seconds: float, per_user_limit: int, max_jobs: int
    ) -> list[pb.ClaimedJob]:
        request = pb.ClaimJobsRequest(
            owner=owner,
            lease_seconds=lease_seconds,
            per_user_limit=per_user_limit,
            max_jobs=max_jobs,
        )
        return list(self._call(self._stub.ClaimJobs, request).jobs)

    def renew_leases(
        self, owner: str, leases: dict[int, int], lease_seconds: float
    ) -> pb.RenewLeasesResponse:
        """Renew `owner`'s leases, {job id: the epoch it holds}."""
        request = pb.RenewLeasesRequest(
            owner=owner,
            leases=[pb.JobLease(job_id=j, lease_epoch=e) for j, e in leases.items()],
            lease_seconds=lease_seconds,
        )
        return self._call(self._stub.RenewLeases, request)

    def check_lease(self, job_id: int, lease_epoch: int) -> bool:
        """Whether `lease_epoch` is still the job's."""
        request = pb.CheckLeaseRequest(job_id=job_id, lease_epoch=lease_epoch)
        return self._call(self._stub.CheckLease, request).current

    def begin_publication(self, job_id: int) -> pb.Job:
        """An ended job with a new lease epoch to publish it under."""
        request = pb.BeginPublicationRequest(job_id=job_id)
        return self._call(self._stub.BeginPublication, request).job

    def request_cancel(self, job_id: int, reason: str) -> pb.Job:
        request = pb.RequestCancelRequest(job_id=job_id, reason=reason)
        return self._call(self._stub.RequestCancel, request).job

    def append_events(
        self, job_id: int, events: Sequence[tuple[int, bytes]], lease_epoch: int = 0
    ) -> int:
        request = pb.AppendJobEventsRequest(
            job_id=job_id,
            events=[pb.JobEventRecord(seq=s, payload=p) for s, p in events],
            lease_epoch=lease_epoch,
        )
        return self._call(self._stub.AppendJobEvents, request).last_seq

    def list_events(self, job_id: int, after_seq: int, limit: int = 0) -> pb.ListJobEventsResponse:
        request = pb.ListJobEventsRequest(job_id=job_id, after_seq=after_seq, limit=limit)
        return self._call(self._stub.ListJobEvents, request)

    def get_job(self, job_id: int) -> pb.Job:
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id)).job

    def list_jobs(self, limit: int = 50, owner: str = "") -> list[pb.Job]:
        request = pb.ListJobsRequest(limit=limit, owner=owner)
        return list(self._call(self._stub.ListJobs, request).jobs)

    def save_article(
        self, article: pb.Article, replace_failed: bool = False, lease_epoch: int = 0
    ) -> pb.SaveArticleResponse:
        request = pb.SaveArticleRequest(
            article=article, replace_failed=replace_failed, lease_epoch=lease_epoch
        )
        return self._call(self._stub.SaveArticle, request)

    def save_articles(self, saves: Sequence[pb.SaveArticleRequest]) -> list[pb.SaveArticleResult]:
        """Many saves in one call; one result each, in order."""
        request = pb.SaveArticlesRequest(saves=saves)
        return list(self._call(self._stub.SaveArticles, request).results)

    def list_articles(
        self,
        job_id: int,
        tier: str = "",
        metadata_only: bool = False,
        status: ArticleStatus.ValueType = ArticleStatus.ARTICLE_STATUS_UNSPECIFIED,
    ) -> list[pb.Article]:
        """Every record of the job (of `tier`, of `status`), in (tier, index) order, page by
        page; without their text for `metadata_only`."""
        return [a for page in self.article_pages(job_id, tier, metadata_only, status) for a in page]

    def article_pages(
        self,
        job_id: int,
        tier: str = "",
        metadata_only: bool = False,
        status: ArticleStatus.ValueType = ArticleStatus.ARTICLE_STATUS_UNSPECIFIED,
    ) -> Iterator[list[pb.Article]]:
        """The job's records a page at a time (about 4 MiB at most): for walking a large job
        without holding it all."""
        request = pb.ListArticlesRequest(
            job_id=job_id, tier=tier, metadata_only=metadata_only, status=status
        )
        while True:
            page = self._call(self._stub.ListArticles, request)
            yield list(page.articles)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def set_urls(self, job_id: int, urls: dict[int, str], lease_epoch: int = 0) -> int:
        request = pb.SetArticleUrlsRequest(
            job_id=job_id,
            urls=[pb.ArticleUrl(article_id=i, url=u) for i, u in urls.items()],
            lease_epoch=lease_epoch,
        )
        return self._call(self._stub.SetArticleUrls, request).updated

    def taken_urls(self, hostnames: list[str], exclude_job_id: int) -> list[str]:
        request = pb.ListTakenUrlsRequest(hostnames=hostnames, exclude_job_id=exclude_job_id)
        return list(self._call(self._stub.ListTakenUrls, request).urls)

    def set_publications(
        self, job_id: int, pages: Sequence[pb.ArticlePublication], lease_epoch: int = 0
    ) -> int:
        """Record rendered pages of the job, in one transaction per call."""
        request = pb.SetArticlePublicationsRequest(
            job_id=job_id, publications=pages, lease_epoch=lease_epoch
        )
        return self._call(self._stub.SetArticlePublications, request).count

    def set_job_files(self, job_id: int, files: dict[str, bytes], lease_epoch: int = 0) -> int:
        """Replace the job's stored files other than its pages."""
        request = pb.SetJobFilesRequest(
            job_id=job_id,
            lease_epoch=lease_epoch,
            files=[pb.JobFile(path=path, content=content) for path, content in files.items()],
        )
        return self._call(self._stub.SetJobFiles, request).count

    def job_files(self, job_id: int) -> Iterator[pb.JobFile]:
        """The job's stored files other than its pages, in path order, read a page at a time."""
        request = pb.ListJobFilesRequest(job_id=job_id)
        while True:
            page = self._call(self._stub.ListJobFiles, request)
            yield from page.files
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def reserve_rate(
        self, bucket: str, per_minute: float, amount: float, holder: str = ""
    ) -> pb.ReserveRateResponse:
        """Take `amount` from a shared rate bucket: how long to wait, and how many share it."""
        request = pb.ReserveRateRequest(
            bucket=bucket, per_minute=per_minute, amount=amount, holder=holder
        )
        return self._call(self._stub.ReserveRate, request)

    def word_samples(self, model: str, limit: int) -> list[tuple[int, int]]:
        """(asked, delivered) words of the model's latest drafts, oldest first."""
        response = self._call(
            self._stub.ListWordSamples, pb.ListWordSamplesRequest(model=model, limit=limit)
        )
        return [(s.asked_words, s.draft_words) for s in response.samples]

    def job_stats(self, job_ids: list[int]) -> pb.GetJobStatsResponse:
        return self._call(self._stub.GetJobStats, pb.GetJobStatsRequest(job_ids=job_ids))

    def verify_credentials(self, username: str, password: str) -> pb.User:
        request = pb.VerifyCredentialsRequest(username=username, password=password)
        return self._call(self._stub.VerifyCredentials, request).user

    def create_user(self, username: str, password: str, role: str) -> pb.User:
        request = pb.CreateUserRequest(username=username, password=password, role=role)
        return self._call(self._stub.CreateUser, request).user

    def get_user(self, username: str) -> pb.User:
        return self._call(self._stub.GetUser, pb.GetUserRequest(username=username)).user

    def token_holder(self, username: str, token_id: str) -> tuple[pb.User, bool]:
        """The user a session token names, and whether that token was revoked."""
        response = self._call(
            self._stub.GetUser, pb.GetUserRequest(username=username, token_id=token_id)
        )
        return response.user, response.token_revoked

    def revoke_token(self, token_id: str, username: str, expires_at: float) -> None:
        """Refuse this session token until `expires_at` (seconds since the epoch)."""
        expire_time = Timestamp()
        expire_time.FromSeconds(int(expires_at))
        request = pb.RevokeTokenRequest(
            token_id=token_id, username=username, expire_time=expire_time
        )
        self._call(self._stub.RevokeToken, request)

    def list_users(self) -> list[pb.User]:
        return list(self._call(self._stub.ListUsers, pb.ListUsersRequest()).users)

    def set_user_active(self, username: str, active: bool) -> pb.User:
        request = pb.SetUserActiveRequest(username=username, active=active)
        return self._call(self._stub.SetUserActive, request).user

    def set_password(self, username: str, password: str) -> pb.User:
        request = pb.SetPasswordRequest(username=username, password=password)
        return self._call(self._stub.SetPassword, request).user

    def stored_secret(self, name: str) -> str:
        return self._call(self._stub.GetStoredSecret, pb.GetStoredSecretRequest(name=name)).value
