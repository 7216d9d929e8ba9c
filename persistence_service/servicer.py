"""PersistenceServicer: proto ⇄ records, store errors ⇄ status codes. No decisions here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.exc import InterfaceError, OperationalError

from persistence_service.client import outline_to_proto
from persistence_service.models import Article, Job, Project, Site, User
from persistence_service.store import (
    ArticleSave,
    AuthenticationError,
    BusyError,
    ConflictError,
    Counts,
    InvalidRecordError,
    NewJobRecord,
    NotFoundError,
    QuotaExceededError,
    QuotaLimits,
    StaleLeaseError,
    StateError,
    Store,
)
from tierwriter import runtime
from tierwriter.job.v1 import job_pb2
from tierwriter.persistence.v1 import persistence_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2_grpc as pb_grpc
from tierwriter.statuses import (
    article_status,
    article_status_word,
    job_status,
    job_status_word,
)

T = TypeVar("T")


@contextmanager
def _status_codes(context: grpc.ServicerContext) -> Iterator[None]:
    """Map the store's errors onto canonical status codes."""
    try:
        yield
    except NotFoundError as e:
        runtime.abort(context, grpc.StatusCode.NOT_FOUND, str(e))
    except InvalidRecordError as e:
        runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except ConflictError as e:
        runtime.abort(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
    except StateError as e:
        runtime.abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except (OperationalError, InterfaceError) as e:  # the database went away: worth a retry
        runtime.abort(
            context, grpc.StatusCode.UNAVAILABLE, f"the database is unavailable: {e.orig}"
        )
    except AuthenticationError as e:
        runtime.abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e))
    except BusyError as e:
        runtime.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except QuotaExceededError as e:
        runtime.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except StaleLeaseError as e:  # a fencing token refused: a sequencer check, in gRPC's words
        runtime.abort(context, grpc.StatusCode.ABORTED, str(e))


def timestamp(moment: datetime | None) -> Timestamp | None:
    """A stored time as a Timestamp; None (the field stays unset) for none. A naive time is
    UTC (SQLite keeps no zone)."""
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def spec_to_dict(spec: job_pb2.JobSpec) -> dict[str, Any]:
    """A job spec as the JSON the `jobs.spec` column keeps: the message's JSON form, field names
    as in the proto, defaults left out."""
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def spec_from_dict(stored: dict[str, Any]) -> job_pb2.JobSpec:
    """A stored spec as its message (migration 0006 brought older rows to this form)."""
    return json_format.ParseDict(stored, job_pb2.JobSpec())


def project_to_proto(p: Project) -> pb.Project:
    """A Project row as its message."""
    return pb.Project(
        id=p.id,
        name=p.name,
        main_keyword=p.main_keyword,
        entities=p.entities,
        related_searches=p.related_searches,
        money_site_url=p.money_site_url,
        owner=p.owner,
    )


def project_fields(p: pb.Project) -> dict[str, Any]:
    """The storable fields of a Project message (`id` is not taken)."""
    return dict(
        owner=p.owner,
        name=p.name.strip(),
        main_keyword=p.main_keyword.strip(),
        entities=list(p.entities),
        related_searches=list(p.related_searches),
        money_site_url=p.money_site_url.strip(),
    )


def user_to_proto(u: User) -> pb.User:
    """A User row as its message (never the hash)."""
    return pb.User(
        id=u.id,
        username=u.username,
        role=u.role,
        active=u.active,
        create_time=timestamp(u.created_at),
        token_version=u.token_version,
    )


def site_to_proto(s: Site) -> pb.Site:
    """A Site row as its message."""
    return pb.Site(id=s.id, hostname=s.hostname, template=s.template, owner=s.owner)


def job_to_proto(j: Job) -> pb.Job:
    """A Job row as its message."""
    return pb.Job(
        id=j.id,
        project_id=j.project_id,
        status=job_status(j.status),
        spec=spec_from_dict(j.spec),
        max_workers=j.max_workers,
        requested_articles=j.requested_articles,
        error=j.error,
        titles=[pb.TierTitles(tier=tier, titles=titles) for tier, titles in j.titles.items()],
        create_time=timestamp(j.created_at),
        finish_time=timestamp(j.finished_at),
        title_api_calls=j.title_api_calls,
        title_prompt_tokens=j.title_prompt_tokens,
        title_completion_tokens=j.title_completion_tokens,
        owner=j.owner,
        title_shortfall=j.title_shortfall,
        title_cost_usd=j.title_cost_usd,
        lease_owner=j.lease_owner,
        cancel_reason=j.cancel_reason,
        last_event_seq=j.last_event_seq,
        retry_failed=j.retry_failed,
        lease_epoch=j.lease_epoch,
    )


# Fields an article record and its message share, name for name and type for type.
ARTICLE_FIELDS = (
    "job_id", "project_id", "tier", "article_index", "keyword", "title", "content", "word_count",
    "error_stage", "error", "site", "api_calls", "prompt_tokens", "completion_tokens",
    "cost_usd", "rate_limited", "content_model", "asked_words", "draft_words", "error_traceback",
    "quality_gates",
)  # fmt: skip
_TEXT_FIELDS = ("content", "error_traceback")  # with the html and outline: not metadata


def article_to_proto(a: Article, with_text: bool = True) -> pb.Article:
    """An Article row as its message; without `content`, `html`, `outline` and
    `error_traceback` unless `with_text`."""
    message = pb.Article(
        **{name: getattr(a, name) for name in ARTICLE_FIELDS if name not in _TEXT_FIELDS},
        id=a.id,
        status=article_status(a.status),
        url=a.url,
        output_path=a.output_path,
    )
    if with_text:
        message.content, message.html = a.content, a.html
        message.error_traceback = a.error_traceback
        if (outline := outline_to_proto(a.outline)) is not None:
            message.outline.CopyFrom(outline)
    return message


def article_from_proto(a: pb.Article) -> dict[str, Any]:
    """The storable fields of an Article message (id, url, output_path and html are not
    taken: post-processing sets them)."""
    outline = (
        [{"h2": section.h2, "h3": list(section.h3)} for section in a.outline.sections]
        if a.HasField("outline")
        else None
    )
    return {
        **{name: getattr(a, name) for name in ARTICLE_FIELDS},
        "status": article_status_word(a.status),  # the store refuses what is no status
        "outline": outline,
    }


# ListArticles pages: records per page by default and at most, and bytes a page stops at (well
# below the 16 MiB message limit even when the last record is as large as a record can be).
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 5000
MAX_SAVES = 1000  # records one SaveArticles call may carry
PAGE_BYTES = 4 * 1024 * 1024
JOB_FILES_PAGE = 100  # job files per ListJobFiles page (a page also ends at PAGE_BYTES)


def _page_position(context: grpc.ServicerContext, token: str) -> tuple[str, int] | None:
    """The (tier, index) a page token says the previous page ended at; None for the first."""
    if not token:
        return None
    tier, _, index = token.rpartition("/")
    if not tier or not index.isdigit():
        runtime.abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, "page_token: not one this service gave"
        )
    return tier, int(index)


def counts_to_proto(c: Counts) -> pb.ArticleCounts:
    """Counts as their message."""
    return pb.ArticleCounts(**vars(c))


class PersistenceServicer(pb_grpc.PersistenceServiceServicer):
    """Translates PersistenceService calls onto the Store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        with _status_codes(context):
            return fn()
        raise AssertionError("unreachable: _status_codes aborts or re-raises")

    def EnsureProject(
        self, request: pb.EnsureProjectRequest, context: grpc.ServicerContext
    ) -> pb.EnsureProjectResponse:
        fields = project_fields(request.project)
        return pb.EnsureProjectResponse(
            project=project_to_proto(
                self._call(context, lambda: self._store.ensure_project(fields))
            )
        )

    def CreateProject(
        self, request: pb.CreateProjectRequest, context: grpc.ServicerContext
    ) -> pb.CreateProjectResponse:
        fields = project_fields(request.project)
        return pb.CreateProjectResponse(
            project=project_to_proto(
                self._call(context, lambda: self._store.create_project(fields))
            )
        )

    def GetProject(
        self, request: pb.GetProjectRequest, context: grpc.ServicerContext
    ) -> pb.GetProjectResponse:
        if not request.project_id and not request.name:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "give project_id or name of a project"
            )
        return pb.GetProjectResponse(
            project=project_to_proto(
                self._call(
                    context,
                    lambda: self._store.get_project(
                        request.project_id, request.name, request.owner
                    ),
                )
            )
        )

    def ListProjects(
        self, request: pb.ListProjectsRequest, context: grpc.ServicerContext
    ) -> pb.ListProjectsResponse:
        projects = self._call(context, lambda: self._store.list_projects(request.owner))
        return pb.ListProjectsResponse(projects=[project_to_proto(p) for p in projects])

    def ListProjectTitles(
        self, request: pb.ListProjectTitlesRequest, context: grpc.ServicerContext
    ) -> pb.ListProjectTitlesResponse:
        titles = self._call(
            context,
            lambda: self._store.project_titles(request.project_id, request.exclude_job_id),
        )
        return pb.ListProjectTitlesResponse(titles=titles)

    def EnsureSites(
        self, request: pb.EnsureSitesRequest, context: grpc.ServicerContext
    ) -> pb.EnsureSitesResponse:
        pairs = [(s.hostname.strip().lower(), s.template.strip()) for s in request.sites]
        sites = self._call(
            context,
            lambda: self._store.ensure_sites(pairs, request.owner, request.any_owner),
        )
        return pb.EnsureSitesResponse(sites=[site_to_proto(s) for s in sites])

    def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.ServicerContext
    ) -> pb.ListSitesResponse:
        hostnames = [h.strip().lower() for h in request.hostnames]
        sites = self._call(context, lambda: self._store.list_sites(request.owner, hostnames))
        return pb.ListSitesResponse(sites=[site_to_proto(s) for s in sites])

    def SetSiteOwner(
        self, request: pb.SetSiteOwnerRequest, context: grpc.ServicerContext
    ) -> pb.SetSiteOwnerResponse:
        hostname = request.hostname.strip().lower()
        site = self._call(context, lambda: self._store.set_site_owner(hostname, request.owner))
        return pb.SetSiteOwnerResponse(site=site_to_proto(site))

    def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.ServicerContext
    ) -> pb.CreateJobResponse:
        spec = spec_to_dict(request.spec)
        job = self._call(
            context,
            lambda: self._store.create_job(
                request.project_id,
                spec,
                request.max_workers,
                request.requested_articles,
                request.owner,
                request.request_id,
            ),
        )
        return pb.CreateJobResponse(job=job_to_proto(job))

    def SubmitJobs(
        self, request: pb.SubmitJobsRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobsResponse:
        sites = [(s.hostname.strip().lower(), s.template.strip()) for s in request.sites]
        jobs = [
            NewJobRecord(
                spec=spec_to_dict(j.spec),
                max_workers=j.max_workers,
                requested=j.requested_articles,
                project_id=j.project_id,
                project=project_fields(j.inline_project)
                if j.WhichOneof("project") == "inline_project"
                else None,
            )
            for j in request.jobs
        ]
        created = self._call(
            context,
            lambda: self._store.submit_jobs(
                request.owner, sites, jobs, request.any_owner, request.request_id
            ),
        )
        return pb.SubmitJobsResponse(jobs=[job_to_proto(j) for j in created])

    def SetQuota(
        self, request: pb.SetQuotaRequest, context: grpc.ServicerContext
    ) -> pb.SetQuotaResponse:
        limits = (
            None
            if request.clear
            else QuotaLimits(request.quota.max_active_articles, request.quota.max_queued_jobs)
        )
        quota = self._call(context, lambda: self._store.set_quota(request.username, limits))
        return pb.SetQuotaResponse(quota=pb.Quota(**vars(quota)))

    def GetQuota(
        self, request: pb.GetQuotaRequest, context: grpc.ServicerContext
    ) -> pb.GetQuotaResponse:
        quota, own, (articles, queued) = self._call(
            context, lambda: self._store.quota(request.username)
        )
        return pb.GetQuotaResponse(
            quota=pb.Quota(**vars(quota)), own=own, active_articles=articles, queued_jobs=queued
        )

    def RecordTitles(
        self, request: pb.RecordTitlesRequest, context: grpc.ServicerContext
    ) -> pb.RecordTitlesResponse:
        job = self._call(
            context,
            lambda: self._store.record_titles(
                request.job_id,
                request.tier,
                list(request.titles),
                request.api_calls,
                request.prompt_tokens,
                request.completion_tokens,
                request.shortfall,
                request.cost_usd,
                request.request_id,
                request.lease_epoch,
            ),
        )
        return pb.RecordTitlesResponse(job=job_to_proto(job))

    def FinishJob(
        self, request: pb.FinishJobRequest, context: grpc.ServicerContext
    ) -> pb.FinishJobResponse:
        job = self._call(
            context,
            lambda: self._store.finish_job(
                request.job_id, job_status_word(request.status), request.error, request.lease_epoch
            ),
        )
        return pb.FinishJobResponse(job=job_to_proto(job))

    def ReopenJob(
        self, request: pb.ReopenJobRequest, context: grpc.ServicerContext
    ) -> pb.ReopenJobResponse:
        return pb.ReopenJobResponse(
            job=job_to_proto(
                self._call(
                    context,
                    lambda: self._store.reopen_job(
                        request.job_id, request.max_cost_usd, request.retry_failed
                    ),
                )
            )
        )

    def ClaimJobs(
        self, request: pb.ClaimJobsRequest, context: grpc.ServicerContext
    ) -> pb.ClaimJobsResponse:
        if not request.owner or request.lease_seconds <= 0 or request.max_jobs < 1:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "owner, a positive lease_seconds and max_jobs: all required",
            )
        claimed = self._call(
            context,
            lambda: self._store.claim_jobs(
                request.owner, request.lease_seconds, request.per_user_limit, request.max_jobs
            ),
        )
        return pb.ClaimJobsResponse(
            jobs=[
                pb.ClaimedJob(job=job_to_proto(job), taken_over=bool(previous),
                              previous_owner=previous)
                for job, previous in claimed
            ]
        )  # fmt: skip

    def RenewLeases(
        self, request: pb.RenewLeasesRequest, context: grpc.ServicerContext
    ) -> pb.RenewLeasesResponse:
        if not request.owner or request.lease_seconds < 0:  # 0: let go of them now
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "owner: required; lease_seconds: must not be negative",
            )
        held, cancels = self._call(
            context,
            lambda: self._store.renew_leases(
                request.owner,
                {lease.job_id: lease.lease_epoch for lease in request.leases},
                request.lease_seconds,
            ),
        )
        return pb.RenewLeasesResponse(
            held=held,
            cancels=[pb.CancelRequest(job_id=j, reason=r) for j, r in cancels.items()],
        )

    def CheckLease(
        self, request: pb.CheckLeaseRequest, context: grpc.ServicerContext
    ) -> pb.CheckLeaseResponse:
        current, epoch = self._call(
            context, lambda: self._store.check_lease(request.job_id, request.lease_epoch)
        )
        return pb.CheckLeaseResponse(current=current, lease_epoch=epoch)

    def BeginPublication(
        self, request: pb.BeginPublicationRequest, context: grpc.ServicerContext
    ) -> pb.BeginPublicationResponse:
        job = self._call(context, lambda: self._store.begin_publication(request.job_id))
        return pb.BeginPublicationResponse(job=job_to_proto(job))

    def RequestCancel(
        self, request: pb.RequestCancelRequest, context: grpc.ServicerContext
    ) -> pb.RequestCancelResponse:
        return pb.RequestCancelResponse(
            job=job_to_proto(
                self._call(
                    context, lambda: self._store.request_cancel(request.job_id, request.reason)
                )
            )
        )

    def AppendJobEvents(
        self, request: pb.AppendJobEventsRequest, context: grpc.ServicerContext
    ) -> pb.AppendJobEventsResponse:
        seqs = [e.seq for e in request.events]
        if any(s < 1 for s in seqs) or len(set(seqs)) != len(seqs):
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "events.seq: each must be positive and appear once",
            )
        last = self._call(
            context,
            lambda: self._store.append_events(
                request.job_id, [(e.seq, e.payload) for e in request.events], request.lease_epoch
            ),
        )
        return pb.AppendJobEventsResponse(last_seq=last)

    def ListJobEvents(
        self, request: pb.ListJobEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobEventsResponse:
        if request.after_seq < 0 or not 0 <= request.limit <= 5000:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "after_seq: must not be negative; limit: 0 to 5000",
            )
        events, status = self._call(
            context,
            lambda: self._store.list_events(
                request.job_id, request.after_seq, request.limit or 500
            ),
        )
        return pb.ListJobEventsResponse(
            events=[pb.JobEventRecord(seq=e.seq, payload=e.payload) for e in events],
            status=job_status(status),
        )

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        return pb.GetJobResponse(
            job=job_to_proto(self._call(context, lambda: self._store.get_job(request.job_id)))
        )

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        jobs = self._call(
            context, lambda: self._store.list_jobs(request.limit or 50, request.owner)
        )
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs])

    def SaveArticle(
        self, request: pb.SaveArticleRequest, context: grpc.ServicerContext
    ) -> pb.SaveArticleResponse:
        article, created = self._call(
            context,
            lambda: self._store.save_article(
                article_from_proto(request.article), request.replace_failed, request.lease_epoch
            ),
        )
        return pb.SaveArticleResponse(article=article_to_proto(article), created=created)

    def SaveArticles(
        self, request: pb.SaveArticlesRequest, context: grpc.ServicerContext
    ) -> pb.SaveArticlesResponse:
        if len(request.saves) > MAX_SAVES:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"saves: at most {MAX_SAVES} records a call, got {len(request.saves)}",
            )
        saves = [
            ArticleSave(article_from_proto(s.article), s.replace_failed, s.lease_epoch)
            for s in request.saves
        ]
        results = self._call(context, lambda: self._store.save_articles(saves))
        return pb.SaveArticlesResponse(
            results=[
                pb.SaveArticleResult(
                    article_id=r.article_id, created=r.created, error=r.error,
                    lease_lost=r.lease_lost,
                )
                for r in results
            ]
        )  # fmt: skip

    def ListArticles(
        self, request: pb.ListArticlesRequest, context: grpc.ServicerContext
    ) -> pb.ListArticlesResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size: 1 to {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})",
            )
        after = _page_position(context, request.page_token)
        size = request.page_size or DEFAULT_PAGE_SIZE
        articles = self._call(
            context,
            lambda: self._store.list_articles(
                request.job_id,
                request.tier,
                after,
                size + 1,
                request.metadata_only,
                article_status_word(request.status) if request.status else "",
            ),
        )
        page, page_bytes = pb.ListArticlesResponse(), 0
        for article in articles[:size]:
            message = article_to_proto(article, not request.metadata_only)
            page.articles.append(message)
            page_bytes += message.ByteSize()
            if page_bytes >= PAGE_BYTES:
                break
        if len(page.articles) < len(articles):  # there is more after the last one sent
            last = page.articles[-1]
            page.next_page_token = f"{last.tier}/{last.article_index}"
        return page

    def SetArticleUrls(
        self, request: pb.SetArticleUrlsRequest, context: grpc.ServicerContext
    ) -> pb.SetArticleUrlsResponse:
        urls = {u.article_id: u.url for u in request.urls}
        if len(urls) != len(request.urls):
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "urls: an article repeats")
        updated = self._call(
            context, lambda: self._store.set_urls(request.job_id, urls, request.lease_epoch)
        )
        return pb.SetArticleUrlsResponse(updated=updated)

    def ListTakenUrls(
        self, request: pb.ListTakenUrlsRequest, context: grpc.ServicerContext
    ) -> pb.ListTakenUrlsResponse:
        urls = self._call(
            context,
            lambda: self._store.taken_urls(list(request.hostnames), request.exclude_job_id),
        )
        return pb.ListTakenUrlsResponse(urls=urls)

    def SetArticlePublications(
        self, request: pb.SetArticlePublicationsRequest, context: grpc.ServicerContext
    ) -> pb.SetArticlePublicationsResponse:
        pages = {p.article_id: (p.output_path, p.html) for p in request.publications}
        count = self._call(
            context,
            lambda: self._store.set_publications(request.job_id, pages, request.lease_epoch),
        )
        return pb.SetArticlePublicationsResponse(count=count)

    def SetJobFiles(
        self, request: pb.SetJobFilesRequest, context: grpc.ServicerContext
    ) -> pb.SetJobFilesResponse:
        files = {f.path: f.content for f in request.files}
        if len(files) != len(request.files):
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "files: a path repeats")
        count = self._call(
            context, lambda: self._store.set_job_files(request.job_id, files, request.lease_epoch)
        )
        return pb.SetJobFilesResponse(count=count)

    def ListJobFiles(
        self, request: pb.ListJobFilesRequest, context: grpc.ServicerContext
    ) -> pb.ListJobFilesResponse:
        files = self._call(
            context,
            lambda: self._store.list_job_files(request.job_id, request.page_token, JOB_FILES_PAGE),
        )
        page, page_bytes = pb.ListJobFilesResponse(), 0
        for f in files:
            page.files.append(pb.JobFile(path=f.path, content=f.content))
            page_bytes += len(f.content)
            if page_bytes >= PAGE_BYTES:
                break
        if len(page.files) == JOB_FILES_PAGE or len(page.files) < len(files):
            page.next_page_token = page.files[-1].path
        return page

    def ReserveRate(
        self, request: pb.ReserveRateRequest, context: grpc.ServicerContext
    ) -> pb.ReserveRateResponse:
        wait, holders = self._call(
            context,
            lambda: self._store.reserve_rate(
                request.bucket, request.per_minute, request.amount, request.holder
            ),
        )
        return pb.ReserveRateResponse(wait_seconds=wait, holders=holders)

    def GetJobStats(
        self, request: pb.GetJobStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetJobStatsResponse:
        if not request.job_ids:
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "job_ids: name at least one job"
            )
        stats = self._call(context, lambda: self._store.job_stats(list(request.job_ids)))
        return pb.GetJobStatsResponse(
            total_jobs=stats.total_jobs,
            processed_jobs=stats.processed_jobs,
            totals=counts_to_proto(stats.totals),
            tiers=[
                pb.TierStats(job_id=job_id, tier=tier, counts=counts_to_proto(c))
                for (job_id, tier), c in stats.tiers.items()
            ],
            title_api_calls=stats.title_api_calls,
            title_prompt_tokens=stats.title_prompt_tokens,
            title_completion_tokens=stats.title_completion_tokens,
            title_shortfall=stats.title_shortfall,
            title_cost_usd=stats.title_cost_usd,
        )

    def ListWordSamples(
        self, request: pb.ListWordSamplesRequest, context: grpc.ServicerContext
    ) -> pb.ListWordSamplesResponse:
        samples = self._call(
            context, lambda: self._store.word_samples(request.model, request.limit or 200)
        )
        return pb.ListWordSamplesResponse(
            samples=[pb.WordSample(asked_words=a, draft_words=d) for a, d in samples]
        )

    def VerifyCredentials(
        self, request: pb.VerifyCredentialsRequest, context: grpc.ServicerContext
    ) -> pb.VerifyCredentialsResponse:
        user: User = self._call(
            context, lambda: self._store.verify_credentials(request.username, request.password)
        )
        return pb.VerifyCredentialsResponse(user=user_to_proto(user))

    def CreateUser(
        self, request: pb.CreateUserRequest, context: grpc.ServicerContext
    ) -> pb.CreateUserResponse:
        return pb.CreateUserResponse(
            user=user_to_proto(
                self._call(
                    context,
                    lambda: self._store.create_user(
                        request.username, request.password, request.role
                    ),
                )
            )
        )

    def GetUser(
        self, request: pb.GetUserRequest, context: grpc.ServicerContext
    ) -> pb.GetUserResponse:
        if request.token_id:
            user, revoked = self._call(
                context, lambda: self._store.token_holder(request.username, request.token_id)
            )
            return pb.GetUserResponse(user=user_to_proto(user), token_revoked=revoked)
        return pb.GetUserResponse(
            user=user_to_proto(self._call(context, lambda: self._store.get_user(request.username)))
        )

    def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: grpc.ServicerContext
    ) -> pb.RevokeTokenResponse:
        if not request.HasField("expire_time"):
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "expire_time: required")
        expires_at = request.expire_time.ToDatetime(tzinfo=UTC)
        self._call(
            context,
            lambda: self._store.revoke_token(request.token_id, request.username, expires_at),
        )
        return pb.RevokeTokenResponse()

    def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.ServicerContext
    ) -> pb.ListUsersResponse:
        users = self._call(context, self._store.list_users)
        return pb.ListUsersResponse(users=[user_to_proto(u) for u in users])

    def SetUserActive(
        self, request: pb.SetUserActiveRequest, context: grpc.ServicerContext
    ) -> pb.SetUserActiveResponse:
        return pb.SetUserActiveResponse(
            user=user_to_proto(
                self._call(
                    context, lambda: self._store.set_user_active(request.username, request.active)
                )
            )
        )

    def SetPassword(
        self, request: pb.SetPasswordRequest, context: grpc.ServicerContext
    ) -> pb.SetPasswordResponse:
        return pb.SetPasswordResponse(
            user=user_to_proto(
                self._call(
                    context, lambda: self._store.set_password(request.username, request.password)
                )
            )
        )

    def GetStoredSecret(
        self, request: pb.GetStoredSecretRequest, context: grpc.ServicerContext
    ) -> pb.GetStoredSecretResponse:
        if not request.name:
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, "name: must not be empty")
        value = self._call(context, lambda: self._store.stored_secret(request.name))
        return pb.GetStoredSecretResponse(value=value)
