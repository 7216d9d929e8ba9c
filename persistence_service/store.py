"""The decisions of persistence_service: each public method is one unit of work."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from persistence_service import repository
from persistence_service.models import (
    ARTICLE_STATUSES,
    FINAL_JOB_STATUSES,
    AppliedRequest,
    Article,
    Job,
    JobEvent,
    JobFile,
    Project,
    Quota,
    RateBucket,
    RateHolder,
    RevokedToken,
    Site,
    StoredSecret,
    User,
    utcnow,
)
from persistence_service.unit_of_work import UnitOfWork
from tierwriter import accounts

log = logging.getLogger(__name__)
_hasher = PasswordHasher()
# Hashed when there is no account to check against, so a miss takes as long as a wrong password.
_TIMING_PASSWORD = "not-a-password-only-spends-time"
# argon2's default hash takes 64 MiB of memory: this many at once bounds what logins can make
# persistence hold, credentials or not; the rest wait their turn, and a call that waited
# HASH_WAIT_SECONDS is told the service is busy.
PASSWORD_HASHES_AT_ONCE = 2
HASH_WAIT_SECONDS = 10.0


class NotFoundError(Exception):
    """The record asked for does not exist."""


class InvalidRecordError(ValueError):
    """A record to be stored breaks a rule; the message names the field."""


class ConflictError(Exception):
    """The record would take a unique name or URL that another record holds."""


class StateError(Exception):
    """The record is not in a state that allows this change (e.g. resuming a running job)."""


class BusyError(Exception):
    """Too many of one costly thing at once (password hashes); try again in a moment."""


class StaleLeaseError(Exception):
    """A write for a job carried a lease epoch that is no longer the job's: another orchestrator
    claimed the job since (a fencing token refused). Nothing of the write was stored."""


class QuotaExceededError(Exception):
    """A submission would take its owner past a quota; the message names it."""


class _HashSlots:
    """At most `at_once` password hashes run at a time; a wait longer than `wait_seconds` is
    BusyError."""

    def __init__(self, at_once: int, wait_seconds: float) -> None:
        self._slots = threading.BoundedSemaphore(at_once)
        self._wait = wait_seconds

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self._wait):
            raise BusyError("too many password checks at once: try again in a few seconds")
        try:
            yield
        finally:
            self._slots.release()


class AuthenticationError(Exception):
    """Username and password do not match an active user."""


@dataclass(frozen=True)
class ArticleSave:
    """One record to store, with how: replacing a failed record (a resume retrying failures),
    under the lease epoch of the run that wrote it."""

    fields: dict[str, Any]
    replace_failed: bool = False
    lease_epoch: int = 0


@dataclass(frozen=True)
class SaveResult:
    """What became of one record of save_articles: its id and whether this save stored it, or
    why it was not stored (`lease_lost`: its lease epoch is stale)."""

    article_id: int = 0
    created: bool = False
    error: str = ""
    lease_lost: bool = False


@dataclass(frozen=True)
class QuotaLimits:
    """How much one user may have waiting and running at once (0: no limit)."""

    max_active_articles: int
    max_queued_jobs: int


# The quota of a user who has none of their own, until an admin sets another default: a job
# file's largest job (10 tiers of 10,000) fits, a runaway script's millions do not.
DEFAULT_QUOTA = QuotaLimits(max_active_articles=100_000, max_queued_jobs=100)


@dataclass(frozen=True)
class NewJobRecord:
    """One job of a submission: its project (inline fields, or an existing id) and its spec."""

    spec: dict[str, Any]
    max_workers: int
    requested: int
    project_id: int = 0
    project: dict[str, Any] | None = None  # inline: found by name, else created


def _fenced(session: Session, job_id: int, lease_epoch: int, exclusive: bool = False) -> Job:
    """The job, held against claims until the transaction ends (`exclusive`: to change its own
    row), if `lease_epoch` is still its own; StaleLeaseError otherwise (invariant 10: a stale
    writer writes nothing)."""
    job = repository.job_under_lease(session, job_id, exclusive)
    if job is None:
        raise NotFoundError(f"job {job_id} does not exist")
    if job.lease_epoch != lease_epoch:
        raise StaleLeaseError(
            f"job {job_id}: lease epoch {lease_epoch} is stale; the job is held under epoch "
            f"{job.lease_epoch} now (another orchestrator took it over)"
        )
    return job


def _check_article(fields: dict[str, Any]) -> None:
    """The rules a record must keep before it is looked at further."""
    if fields.get("status") not in ARTICLE_STATUSES:
        raise InvalidRecordError(f"article.status: must be one of {', '.join(ARTICLE_STATUSES)}")
    if not fields.get("tier"):
        raise InvalidRecordError("article.tier: must not be empty")
    if fields.get("article_index", -1) < 0:
        raise InvalidRecordError("article.article_index: must not be negative")


def _article_key(fields: dict[str, Any]) -> tuple[int, str, int]:
    return fields["job_id"], fields["tier"], fields["article_index"]


def _put_article(
    session: Session, existing: Article | None, fields: dict[str, Any], replace_failed: bool
) -> tuple[Article, bool]:
    """A record into the session for its key (not committed); (record, whether it changes
    anything). A stored *skipped* record is replaced, a *failed* one with `replace_failed`; any
    other stored record stays as it is."""
    replaceable = ("failed", "skipped") if replace_failed else ("skipped",)
    if existing is not None and existing.status in replaceable:
        for name, value in fields.items():
            setattr(existing, name, value)
        existing.created_at = utcnow()
        return existing, True
    if existing is not None:
        return existing, False
    article = Article(**fields)
    session.add(article)
    return article, True


_PASSWORD_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"


def generate_password(length: int = 24) -> str:
    """A random password of letters and digits (~137 bits at 24): nothing a shell or a
    command-line parser reads specially; token_urlsafe's leading "-" looked like an option."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))


def check_username(username: str) -> None:
    """InvalidRecordError naming the field unless `username` follows the account rules."""
    problem = accounts.username_problem(username)
    if problem:
        raise InvalidRecordError(problem)


def check_password(password: str) -> None:
    """InvalidRecordError naming the field unless the password's length is within the limits
    (the message never repeats the password)."""
    problem = accounts.password_problem(password)
    if problem:
        raise InvalidRecordError(problem)


@dataclass
class Counts:
    """Article counts for one tier or a total; every number comes from the records."""

    requested: int = 0
    generated: int = 0
    augmented: int = 0
    failed: int = 0
    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    words: int = 0
    short: int = 0
    long: int = 0
    skipped: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0

    def add(self, other: Counts) -> None:
        """Add another count into this one."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Stats:
    """GetJobStats' answer: per (job, tier) counts, their total, and the title costs."""

    total_jobs: int
    processed_jobs: int
    totals: Counts
    tiers: dict[tuple[int, str], Counts] = field(default_factory=dict)
    title_api_calls: int = 0
    title_prompt_tokens: int = 0
    title_completion_tokens: int = 0
    title_shortfall: int = 0
    title_cost_usd: float = 0.0


def _put_sites(
    session: Session, sites: Sequence[tuple[str, str]], owner: str, any_owner: bool
) -> list[Site]:
    """ensure_sites' work inside a transaction (not committed): the stored sites, in order."""
    for hostname, _template in sites:
        if not hostname:
            raise InvalidRecordError("site.hostname: must not be empty")
    stored = {s.hostname: s for s in repository.sites_by_hostname(session, sites)}
    for hostname, template in sites:
        site = stored.get(hostname)
        if site is None:
            site = Site(hostname=hostname, template=template, owner=owner)
            stored[hostname] = site
            session.add(site)
            continue
        if site.owner != owner and not any_owner:
            raise ConflictError(
                f"site {hostname} belongs to another user: use a hostname of your own"
            )
        if template:
            site.template = template
    return [stored[hostname] for hostname, _ in sites]


def _quota_problem(limits: QuotaLimits, used: tuple[int, int], adding: tuple[int, int]) -> str:
    """Why adding (articles, queued jobs) to what a user has passes their quota, or ""."""
    (articles, queued), (new_articles, new_jobs) = used, adding
    if limits.max_active_articles and articles + new_articles > limits.max_active_articles:
        return (
            f"quota: {new_articles:,} more articles would make {articles + new_articles:,} queued "
            f"and running, past your quota of {limits.max_active_articles:,} (you have "
            f"{articles:,}); wait for your jobs to finish, or ask an admin for a larger quota"
        )
    if limits.max_queued_jobs and queued + new_jobs > limits.max_queued_jobs:
        return (
            f"quota: {new_jobs} more jobs would make {queued + new_jobs} queued, past your quota "
            f"of {limits.max_queued_jobs} (you have {queued}); wait for them to start, or ask "
            "an admin for a larger quota"
        )
    return ""


class Store:
    """Projects, jobs, articles and users; one fresh session per method call."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        password_hashes_at_once: int = PASSWORD_HASHES_AT_ONCE,
    ) -> None:
        self._session_factory = session_factory
        self._hashes = _HashSlots(password_hashes_at_once, HASH_WAIT_SECONDS)
        self._rate_lock = threading.Lock()  # see _rate_guard

    def _uow(self) -> UnitOfWork:
        return UnitOfWork(self._session_factory)

    # Projects -------------------------------------------------------------------------------

    def ensure_project(self, fields: dict[str, Any]) -> Project:
        """fields["owner"]'s project named fields["name"], created from `fields` if it does not
        exist yet. Two jobs racing to create the same project both get the one that won."""
        if not fields.get("name"):
            raise InvalidRecordError("project.name: must not be empty")
        owner = fields.get("owner", "")
        with self._uow() as uow:
            existing = repository.project_by_name(uow.session, owner, fields["name"])
            if existing is not None:
                return existing
            project = Project(**fields)
            uow.session.add(project)
            try:
                uow.commit()
                return project
            except IntegrityError as e:
                conflict = e  # most likely another call created it between our read and insert
        with self._uow() as uow:
            found = repository.project_by_name(uow.session, owner, fields["name"])
            if found is None:
                raise InvalidRecordError(f"project: not stored: {conflict.orig}") from conflict
            return found

    def create_project(self, fields: dict[str, Any]) -> Project:
        """A new project; ConflictError when the name is taken."""
        if not fields.get("name"):
            raise InvalidRecordError("project.name: must not be empty")
        if not fields.get("main_keyword"):
            raise InvalidRecordError("project.main_keyword: must not be empty")
        with self._uow() as uow:
            project = Project(**fields)
            uow.session.add(project)
            try:
                uow.commit()
            except IntegrityError as e:
                raise ConflictError(f"project {fields['name']!r} already exists") from e
            return project

    def get_project(self, project_id: int = 0, name: str = "", owner: str = "") -> Project:
        """One project by id, or by `owner`'s project name when the id is 0; NotFoundError names
        what was asked."""
        with self._uow() as uow:
            if project_id:
                project = uow.session.get(Project, project_id)
                wanted = str(project_id)
            else:
                project = repository.project_by_name(uow.session, owner, name)
                wanted = repr(name)
            if project is None:
                raise NotFoundError(f"project {wanted} does not exist")
            return project

    def list_projects(self, owner: str = "") -> Sequence[Project]:
        """The owner's projects (everyone's when `owner` is empty), by name."""
        with self._uow() as uow:
            return repository.projects_of(uow.session, owner)

    def project_titles(self, project_id: int, exclude_job_id: int = 0) -> list[str]:
        """The titles of the project's jobs (but `exclude_job_id`), oldest job first."""
        with self._uow() as uow:
            if uow.session.get(Project, project_id) is None:
                raise NotFoundError(f"project {project_id} does not exist")
            titles: list[str] = []
            for job in repository.jobs_of_project(uow.session, project_id):
                if job.id != exclude_job_id:
                    for tier_titles in job.titles.values():
                        titles.extend(tier_titles)
            return titles

    # Sites ----------------------------------------------------------------------------------

    def ensure_sites(
        self, sites: Sequence[tuple[str, str]], owner: str, any_owner: bool = False
    ) -> list[Site]:
        """(hostname, template) pairs as stored sites of `owner`: missing ones are created as
        theirs, a given template replaces the stored one, an empty one leaves it. In request
        order. A stored site of someone else is ConflictError and nothing is written, unless
        `any_owner` (an admin: the site keeps its owner)."""
        if not owner:
            raise InvalidRecordError("owner: required")
        for _attempt in range(2):  # a concurrent job may create one of them between read and write
            with self._uow() as uow:
                stored = _put_sites(uow.session, sites, owner, any_owner)
                try:
                    uow.commit()
                except IntegrityError as e:
                    conflict = e
                    continue
                return stored
        raise InvalidRecordError(f"sites: not stored: {conflict.orig}") from conflict

    def list_sites(self, owner: str = "", hostnames: Sequence[str] = ()) -> Sequence[Site]:
        """The owner's sites (everyone's when `owner` is empty), only those of `hostnames` when
        given, by hostname."""
        with self._uow() as uow:
            return repository.sites_of(uow.session, owner, hostnames)

    def set_site_owner(self, hostname: str, owner: str) -> Site:
        """Give a site to another user; NotFoundError for an unknown site or user."""
        with self._uow() as uow:
            self._user(uow.session, owner)
            site = repository.site_by_hostname(uow.session, hostname, for_update=True)
            if site is None:
                raise NotFoundError(f"site {hostname!r} does not exist")
            site.owner = owner
            uow.commit()
            return site

    # Jobs -----------------------------------------------------------------------------------

    def create_job(
        self,
        project_id: int,
        spec: dict[str, Any],
        max_workers: int,
        requested: int,
        owner: str,
        request_id: str = "",
    ) -> Job:
        """A job record in status queued. With `request_id`, a second call (a retry after a
        lost answer) returns the job the first one made."""
        if max_workers < 1:
            raise InvalidRecordError("max_workers: must be at least 1")
        with self._uow() as uow:
            if request_id and (done := uow.session.get(AppliedRequest, request_id)):
                return self._job(uow.session, done.job_id)
            if uow.session.get(Project, project_id) is None:
                raise NotFoundError(f"project {project_id} does not exist")
            job = Job(
                project_id=project_id,
                spec=spec,
                max_workers=max_workers,
                requested_articles=requested,
                owner=owner,
                status="queued",
                titles={},
            )
            uow.session.add(job)
            uow.session.flush()
            if request_id:
                uow.session.add(AppliedRequest(request_id=request_id, job_id=job.id))
            uow.commit()
            return job

    def submit_jobs(
        self,
        owner: str,
        sites: Sequence[tuple[str, str]],
        jobs: Sequence[NewJobRecord],
        any_owner: bool = False,
        request_id: str = "",
    ) -> list[Job]:
        """A job file's sites, inline projects and jobs (queued), in one transaction: all of
        it, or (a quota passed, another user's site, a project that does not exist) nothing.
        One user's submissions are checked one at a time, so two at once cannot pass a quota
        together. With `request_id`, a retry after a lost answer returns the same jobs."""
        if not owner:
            raise InvalidRecordError("owner: required")
        if not jobs:
            raise InvalidRecordError("jobs: at least one")
        for n, new in enumerate(jobs):
            if new.max_workers < 1:
                raise InvalidRecordError(f"jobs[{n}].max_workers: must be at least 1")
        keys = [f"{request_id}:{n}" for n in range(len(jobs))] if request_id else []
        for _attempt in range(2):  # a project or site made by a concurrent call: try once more
            with self._uow() as uow:
                session = uow.session
                done = session.get(AppliedRequest, keys[0]) if keys else None
                if done is not None:  # stored with the jobs, so all of them are
                    applied = [session.get(AppliedRequest, key) for key in keys]
                    return [self._job(session, a.job_id) for a in applied if a]
                repository.lock_submissions(session, owner)
                limits, _own = self._limits(session, owner)
                adding = (sum(j.requested for j in jobs), len(jobs))
                used = repository.active_usage(session, owner)
                if problem := _quota_problem(limits, used, adding):
                    raise QuotaExceededError(problem)
                if sites:
                    _put_sites(session, sites, owner, any_owner)
                created: list[Job] = []
                for n, new in enumerate(jobs):
                    project_id = self._project_for(session, new, owner, n)
                    job = Job(
                        project_id=project_id,
                        spec=new.spec,
                        max_workers=new.max_workers,
                        requested_articles=new.requested,
                        owner=owner,
                        status="queued",
                        titles={},
                    )
                    session.add(job)
                    session.flush()
                    if keys:
                        session.add(AppliedRequest(request_id=keys[n], job_id=job.id))
                    created.append(job)
                try:
                    uow.commit()
                except IntegrityError as e:
                    conflict = e
                    continue
                return created
        raise InvalidRecordError(f"jobs: not stored: {conflict.orig}") from conflict

    @staticmethod
    def _project_for(session: Session, new: NewJobRecord, owner: str, n: int) -> int:
        """The id of job n's project: the one it names, or its inline one (created if the
        owner has none of that name)."""
        if new.project is None:
            if session.get(Project, new.project_id) is None:
                raise NotFoundError(
                    f"jobs[{n}].project_id: project {new.project_id} does not exist"
                )
            return new.project_id
        fields = {**new.project, "owner": owner}
        if not fields.get("name"):
            raise InvalidRecordError(f"jobs[{n}].project.name: must not be empty")
        found = repository.project_by_name(session, owner, fields["name"])
        if found is None:
            found = Project(**fields)
            session.add(found)
            session.flush()
        return found.id

    # Quotas ---------------------------------------------------------------------------------

    @staticmethod
    def _limits(session: Session, username: str) -> tuple[QuotaLimits, bool]:
        """The quota that applies to the user, and whether it is their own."""
        own = repository.quota_of(session, username) if username else None
        row = own or repository.quota_of(session, "")
        if row is None:
            return DEFAULT_QUOTA, False
        return QuotaLimits(row.max_active_articles, row.max_queued_jobs), own is not None

    def quota(self, username: str) -> tuple[QuotaLimits, bool, tuple[int, int]]:
        """The user's quota ("": the default one), whether it is their own, and what they use
        of it now: (articles of their queued and running jobs, their queued jobs)."""
        with self._uow() as uow:
            if username:
                self._user(uow.session, username)
            limits, own = self._limits(uow.session, username)
            used = repository.active_usage(uow.session, username) if username else (0, 0)
            return limits, own, used

    def set_quota(self, username: str, limits: QuotaLimits | None) -> QuotaLimits:
        """Set a user's own quota ("": the default of everyone without one); None removes a
        user's own, so the default applies again. Returns the quota that applies now."""
        if limits is not None and (limits.max_active_articles < 0 or limits.max_queued_jobs < 0):
            raise InvalidRecordError("quota: the limits must not be negative (0: no limit)")
        if limits is None and not username:
            raise InvalidRecordError("username: the default quota can be changed, not removed")
        with self._uow() as uow:
            if username:
                self._user(uow.session, username)
            row = repository.quota_of(uow.session, username)
            if limits is None:
                if row is not None:
                    uow.session.delete(row)
            elif row is None:
                uow.session.add(Quota(username=username, **vars(limits)))
            else:
                row.max_active_articles = limits.max_active_articles
                row.max_queued_jobs = limits.max_queued_jobs
            uow.commit()
            return self._limits(uow.session, username)[0]

    def record_titles(
        self,
        job_id: int,
        tier: str,
        titles: list[str],
        api_calls: int,
        prompt: int,
        completion: int,
        shortfall: int = 0,
        cost_usd: float = 0.0,
        request_id: str = "",
        lease_epoch: int = 0,
    ) -> Job:
        """Keep a tier's titles with the job and add what they cost and how many are missing,
        under the job's current lease epoch (StaleLeaseError otherwise). With `request_id`, a
        second call (a retry after a lost answer) changes nothing."""
        with self._uow() as uow:
            job = _fenced(uow.session, job_id, lease_epoch, exclusive=True)
            if request_id:
                if uow.session.get(AppliedRequest, request_id):
                    return job
                uow.session.add(AppliedRequest(request_id=request_id, job_id=job_id))
            job.titles = {**job.titles, tier: list(titles)}  # reassign: JSON columns track identity
            job.title_api_calls += api_calls
            job.title_prompt_tokens += prompt
            job.title_completion_tokens += completion
            job.title_shortfall += shortfall
            job.title_cost_usd += cost_usd
            uow.commit()
            return job

    def finish_job(self, job_id: int, status: str, error: str, lease_epoch: int = 0) -> Job:
        """Set a job's final status and end its lease, under the lease epoch the run held
        (StaleLeaseError once another orchestrator took the job over)."""
        if status not in FINAL_JOB_STATUSES:
            raise InvalidRecordError(f"status: must be one of {', '.join(FINAL_JOB_STATUSES)}")
        with self._uow() as uow:
            job = _fenced(uow.session, job_id, lease_epoch, exclusive=True)
            job.status, job.error = status, error
            job.finished_at = repository.database_now(uow.session)
            job.lease_owner, job.lease_expires_at, job.cancel_reason = "", None, ""
            uow.commit()
            return job

    def reopen_job(self, job_id: int, max_cost_usd: float = 0.0, retry_failed: bool = False) -> Job:
        """Queue a job that is not running, to resume it (with `retry_failed`, its failed
        articles too), with a new budget in its spec when `max_cost_usd` is given. StateError
        when it is queued or running already: one job never runs twice at once;
        QuotaExceededError when queueing it again would pass its owner's quota."""
        if max_cost_usd < 0:
            raise InvalidRecordError("max_cost_usd: must not be negative")
        with self._uow() as uow:
            job = self._job(uow.session, job_id, for_update=True)
            if job.status in ("running", "queued"):
                raise StateError(f"job {job_id} is {job.status}; cancel it first or wait for it")
            repository.lock_submissions(uow.session, job.owner)  # as submit_jobs checks it
            limits, _own = self._limits(uow.session, job.owner)
            used = repository.active_usage(uow.session, job.owner)
            if problem := _quota_problem(limits, used, (job.requested_articles, 1)):
                raise QuotaExceededError(problem)
            job.status, job.error, job.finished_at = "queued", "", None
            job.cancel_reason, job.retry_failed = "", retry_failed
            if max_cost_usd:
                job.spec = {**job.spec, "max_cost_usd": max_cost_usd}  # reassign: JSON column
            uow.commit()
            return job

    def claim_jobs(
        self, owner: str, lease_seconds: float, per_user_limit: int, max_jobs: int
    ) -> list[tuple[Job, str]]:
        """Jobs for orchestrator `owner` to run, each with the lease owner it was taken from
        ("" for a queued job): first running jobs whose lease expired (their orchestrator
        died or lost the database), then queued jobs in order while their user runs fewer than
        `per_user_limit` (0: no limit). Claims are serialized, so two orchestrators never take
        the same job and the limit holds across them. A project runs one job at a time (its
        jobs' titles must all differ), so a queued job waits for its project's running one.
        Every claim raises the job's lease epoch: writes made under the one before are refused
        from now on. Leases are timed by the database's clock."""
        claimed: list[tuple[Job, str]] = []
        with self._uow() as uow:
            repository.lock_claims(uow.session)
            now = repository.database_now(uow.session)
            until = now + timedelta(seconds=lease_seconds)
            for job in repository.jobs_with_expired_lease(uow.session, now, max_jobs):
                claimed.append((job, job.lease_owner))
                job.lease_owner, job.lease_expires_at = owner, until
                job.lease_epoch += 1
            running = repository.running_jobs_per_user(uow.session)
            # One job of a project at a time: each job's titles must differ from the others'.
            busy_projects = repository.projects_with_running_jobs(uow.session)
            for job in repository.jobs_with_status(uow.session, "queued"):
                if len(claimed) >= max_jobs:
                    break
                if per_user_limit and running.get(job.owner, 0) >= per_user_limit:
                    continue
                if job.project_id in busy_projects:
                    continue
                running[job.owner] = running.get(job.owner, 0) + 1
                busy_projects.add(job.project_id)
                job.status, job.lease_owner, job.lease_expires_at = "running", owner, until
                job.lease_epoch += 1
                claimed.append((job, ""))
            uow.commit()
            return claimed

    def renew_leases(
        self, owner: str, leases: dict[int, int], lease_seconds: float
    ) -> tuple[list[int], dict[int, str]]:
        """Extend `owner`'s leases on these jobs ({job id: the epoch it holds}): the ids it still
        holds under that epoch, and the cancel reasons asked for any of them."""
        with self._uow() as uow:
            held = repository.leased_jobs(uow.session, owner, leases)
            until = repository.database_now(uow.session) + timedelta(seconds=lease_seconds)
            for job in held:
                job.lease_expires_at = until
            uow.commit()
            return [j.id for j in held], {j.id: j.cancel_reason for j in held if j.cancel_reason}

    def check_lease(self, job_id: int, lease_epoch: int) -> tuple[bool, int]:
        """Whether `lease_epoch` is still the job's, and the job's epoch now. Only advice (the
        writes are fenced themselves): a generator asks before it starts an article."""
        with self._uow() as uow:
            job = self._job(uow.session, job_id)
            return job.lease_epoch == lease_epoch, job.lease_epoch

    def begin_publication(self, job_id: int) -> Job:
        """A new lease epoch for publishing an ended job again: a publication of it still
        writing under an older epoch is refused from now on. StateError while it is queued or
        running (its run publishes it)."""
        with self._uow() as uow:
            job = self._job(uow.session, job_id, for_update=True)
            if job.status in ("queued", "running"):
                raise StateError(f"job {job_id} is {job.status}: its run publishes it")
            job.lease_epoch += 1
            uow.commit()
            return job

    def request_cancel(self, job_id: int, reason: str) -> Job:
        """Cancel a queued job at once; ask the orchestrator holding a running one to cancel it
        (it sees the request when it renews the lease). StateError for a job that is neither."""
        with self._uow() as uow:
            job = self._job(uow.session, job_id, for_update=True)
            if job.status == "queued":
                job.status, job.finished_at = "cancelled", utcnow()
                job.error = f"cancelled: {reason}"
            elif job.status == "running":
                job.cancel_reason = job.cancel_reason or reason
            else:
                raise StateError(f"job {job_id} is not running (status {job.status})")
            uow.commit()
            return job

    def append_events(
        self, job_id: int, events: Sequence[tuple[int, bytes]], lease_epoch: int = 0
    ) -> int:
        """Store a job's events (sequence number, payload) emitted under `lease_epoch`; ones
        stored already (a retried call) are kept as they are. StaleLeaseError, and nothing
        stored, once another orchestrator took the job over. Returns the last sequence number."""
        with self._uow() as uow:
            job = _fenced(uow.session, job_id, lease_epoch, exclusive=True)
            if events:
                stored = repository.event_seqs(
                    uow.session, job_id, min(s for s, _ in events), max(s for s, _ in events)
                )
                uow.session.add_all(
                    JobEvent(job_id=job_id, seq=seq, payload=payload)
                    for seq, payload in events
                    if seq not in stored
                )
                job.last_event_seq = max(job.last_event_seq, *(s for s, _ in events))
            uow.commit()
            return job.last_event_seq

    def list_events(self, job_id: int, after_seq: int, limit: int) -> tuple[list[JobEvent], str]:
        """A job's stored events after `after_seq`, in order, and the job's status."""
        with self._uow() as uow:
            job = self._job(uow.session, job_id)
            return list(repository.events_after(uow.session, job_id, after_seq, limit)), job.status

    def get_job(self, job_id: int) -> Job:
        """One job; NotFoundError names the id."""
        with self._uow() as uow:
            return self._job(uow.session, job_id)

    def list_jobs(self, limit: int, owner: str = "") -> Sequence[Job]:
        """The owner's jobs (everyone's when `owner` is empty), newest first."""
        with self._uow() as uow:
            return repository.recent_jobs(uow.session, limit, owner)

    @staticmethod
    def _job(session: Session, job_id: int, for_update: bool = False) -> Job:
        job = session.get(Job, job_id, with_for_update=for_update)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist")
        return job

    # Articles -------------------------------------------------------------------------------

    def save_article(
        self, fields: dict[str, Any], replace_failed: bool = False, lease_epoch: int = 0
    ) -> tuple[Article, bool]:
        """Store an article's terminal record, written under the job's lease epoch
        `lease_epoch` (StaleLeaseError, and nothing stored, once another orchestrator holds
        the job); (record, created).

        Idempotent on (job, tier, index): when the record exists — a retried call, a restarted
        generator — the stored one is returned unchanged and created is False. With
        `replace_failed` (a resume retrying failed articles), a stored *failed* record is
        replaced in place by this one, and a *skipped* one (over a budget) always is: still one
        record per key."""
        _check_article(fields)
        key = _article_key(fields)
        with self._uow() as uow:
            _fenced(uow.session, fields["job_id"], lease_epoch)
            existing = repository.article_by_key(uow.session, *key)
            article, created = _put_article(uow.session, existing, fields, replace_failed)
            if not created:
                return article, False
            try:
                uow.commit()
                return article, True
            except IntegrityError as e:
                conflict = e  # a concurrent save of the same key won, or a reference is bad
        with self._uow() as uow:
            found = repository.article_by_key(uow.session, *key)
            if found is None:  # not a race: e.g. project_id names no project
                raise InvalidRecordError(f"article: not stored: {conflict.orig}") from conflict
            return found, False

    def save_articles(self, saves: Sequence[ArticleSave]) -> list[SaveResult]:
        """Store many terminal records in one transaction: one commit and one lookup for all,
        each judged as save_article judges it alone. An invalid record, one whose job does not
        exist or whose lease epoch is stale gets its error and the others are stored. Should
        the transaction conflict (a concurrent save of the same key, a bad reference), each
        record is saved on its own instead, so one cannot take the others down with it."""
        results: dict[int, SaveResult] = {}  # by position in `saves`
        valid: list[int] = []
        for i, save in enumerate(saves):
            try:
                _check_article(save.fields)
                valid.append(i)
            except InvalidRecordError as e:
                results[i] = SaveResult(error=str(e))
        try:
            with self._uow() as uow:
                jobs: dict[int, Job | None] = {}  # each held against claims until the commit
                for job_id in sorted({saves[i].fields["job_id"] for i in valid}):
                    jobs[job_id] = repository.job_under_lease(uow.session, job_id)
                stored = repository.articles_by_keys(
                    uow.session, [_article_key(saves[i].fields) for i in valid]
                )
                written: list[tuple[int, Article, bool]] = []
                for i in valid:
                    save = saves[i]
                    job = jobs[save.fields["job_id"]]
                    if job is None:
                        results[i] = SaveResult(error=f"job {save.fields['job_id']} does not exist")
                        continue
                    if job.lease_epoch != save.lease_epoch:
                        results[i] = SaveResult(
                            error=f"job {job.id}: lease epoch {save.lease_epoch} is stale; the "
                            f"job is held under epoch {job.lease_epoch} now",
                            lease_lost=True,
                        )
                        continue
                    key = _article_key(save.fields)
                    article, created = _put_article(
                        uow.session, stored.get(key), save.fields, save.replace_failed
                    )
                    stored[key] = article  # a key given twice: the second finds the first
                    written.append((i, article, created))
                uow.commit()
        except IntegrityError:
            for i in valid:
                if i not in results:
                    results[i] = self._save_alone(saves[i])
        else:
            for i, article, created in written:
                results[i] = SaveResult(article.id, created)
        return [results[i] for i in range(len(saves))]

    def _save_alone(self, save: ArticleSave) -> SaveResult:
        try:
            article, created = self.save_article(save.fields, save.replace_failed, save.lease_epoch)
            return SaveResult(article.id, created)
        except StaleLeaseError as e:
            return SaveResult(error=str(e), lease_lost=True)
        except (InvalidRecordError, NotFoundError) as e:
            return SaveResult(error=str(e))

    def list_articles(
        self,
        job_id: int,
        tier: str = "",
        after: tuple[str, int] | None = None,
        limit: int | None = None,
        metadata_only: bool = False,
        status: str = "",
    ) -> Sequence[Article]:
        """A job's records in (tier, index) order (of one status, if given): after (tier,
        index) `after`, at most `limit`, without their text for `metadata_only`."""
        with self._uow() as uow:
            self._job(uow.session, job_id)
            return repository.articles_of_job(
                uow.session, job_id, tier, after, limit, metadata_only, status
            )

    def set_urls(self, job_id: int, urls: dict[int, str], lease_epoch: int = 0) -> int:
        """Give the job's articles their URLs, all in one commit or none, under the job's lease
        epoch (StaleLeaseError otherwise). ConflictError when a URL is held by another article
        (a concurrent job on the same site took it first)."""
        with self._uow() as uow:
            _fenced(uow.session, job_id, lease_epoch)
            articles = {a.id: a for a in repository.articles_by_ids(uow.session, list(urls))}
            for article_id, url in urls.items():
                article = articles.get(article_id)
                if article is None or article.job_id != job_id:
                    raise NotFoundError(f"article {article_id} of job {job_id} does not exist")
                if not url:
                    raise InvalidRecordError(f"urls[{article_id}]: must not be empty")
                article.url = url
            try:
                uow.commit()
            except IntegrityError as e:
                raise ConflictError(f"urls: a URL is already taken: {e.orig}") from e
            return len(urls)

    def taken_urls(self, hostnames: Sequence[str], exclude_job_id: int) -> list[str]:
        """URLs that other jobs' articles hold on these sites."""
        with self._uow() as uow:
            return repository.urls_on_sites(uow.session, hostnames, exclude_job_id)

    def set_publications(
        self, job_id: int, pages: dict[int, tuple[str, str]], lease_epoch: int = 0
    ) -> int:
        """Record the pages post-processing rendered, {article id: (output path, html)}, all
        of articles of `job_id`, in one transaction under the job's lease epoch: all or none
        (NotFoundError when an article is not the job's, StaleLeaseError when the epoch is
        stale)."""
        with self._uow() as uow:
            _fenced(uow.session, job_id, lease_epoch)
            articles = repository.articles_by_ids(uow.session, list(pages))
            missing = set(pages) - {a.id for a in articles if a.job_id == job_id}
            if missing:
                raise NotFoundError(f"article {min(missing)} of job {job_id} does not exist")
            for article in articles:
                article.output_path, article.html = pages[article.id]
            uow.commit()
            return len(articles)

    def set_job_files(self, job_id: int, files: dict[str, bytes], lease_epoch: int = 0) -> int:
        """Replace the job's stored files other than its pages with `files` ({path inside the
        job's folder: bytes}), under its lease epoch (StaleLeaseError otherwise)."""
        for path in files:
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise InvalidRecordError(f"files.path: {path!r} is not a path inside the job")
        with self._uow() as uow:
            _fenced(uow.session, job_id, lease_epoch)
            repository.delete_job_files(uow.session, job_id)
            uow.session.add_all(
                JobFile(job_id=job_id, path=path, content=content)
                for path, content in files.items()
            )
            uow.commit()
            return len(files)

    def list_job_files(self, job_id: int, after: str = "", limit: int = 100) -> Sequence[JobFile]:
        """The job's stored files other than its pages, in path order, after the path `after`."""
        with self._uow() as uow:
            self._job(uow.session, job_id)
            return repository.job_files(uow.session, job_id, after, limit)

    # Shared provider limits -----------------------------------------------------------------

    def reserve_rate(
        self, bucket: str, per_minute: float, amount: float, holder: str = ""
    ) -> tuple[float, int]:
        """Take `amount` from a bucket shared by every generator: it holds `per_minute` and
        refills that much a minute, continuously, by the database's clock; its level may go
        below zero (taken ahead), and the caller waits until it would be back at zero. Returns
        (seconds to wait, holders that drew on it in the last minute; 0 without `holder`)."""
        if not bucket:
            raise InvalidRecordError("bucket: must not be empty")
        if per_minute <= 0 or amount < 0:
            raise InvalidRecordError("per_minute: must be positive; amount: must not be negative")
        if amount > per_minute:
            raise InvalidRecordError(
                f"amount: {amount:,.0f} is more than the bucket holds ({per_minute:,.0f})"
            )
        rate = per_minute / 60.0
        # Two first reservations of a new bucket (or holder) may race its insert, on two
        # persistence replicas too: the loser's flush or commit fails, and it tries once more.
        for _attempt in range(2):
            with self._uow() as uow, self._rate_guard(uow.session):
                now = repository.database_seconds(uow.session)
                row = repository.rate_bucket(uow.session, bucket)
                if row is None:
                    row = RateBucket(bucket=bucket, level=per_minute, updated=now)
                    uow.session.add(row)
                elapsed = max(0.0, now - row.updated)
                row.level = min(per_minute, row.level + elapsed * rate) - amount
                row.updated = max(row.updated, now)
                wait = max(0.0, -row.level / rate)
                holders = 0
                try:
                    if holder:
                        seen = repository.rate_holder(uow.session, bucket, holder)
                        if seen is None:
                            uow.session.add(RateHolder(bucket=bucket, holder=holder, seen=now))
                        else:
                            seen.seen = now
                        uow.session.flush()
                        holders = repository.count_holders(uow.session, bucket, now - 60.0)
                    uow.commit()
                except IntegrityError:
                    continue
                return wait, holders
        raise BusyError(f"rate bucket {bucket!r}: could not be created; try again")

    def _rate_guard(self, session: Session) -> AbstractContextManager[object]:
        """SQLite: the process's lock keeps a bucket's read and write together (a transaction
        that read could not write after another's commit). PostgreSQL locks the bucket's row
        instead, so buckets never wait for each other there."""
        if session.get_bind().dialect.name == "sqlite":
            return self._rate_lock
        return nullcontext()

    def job_stats(self, job_ids: Sequence[int]) -> Stats:
        """Counts over the given jobs, computed from the records in one read."""
        with self._uow() as uow:
            jobs = repository.jobs_by_ids(uow.session, job_ids)
            missing = set(job_ids) - {job.id for job in jobs}
            if missing:
                raise NotFoundError(f"job {min(missing)} does not exist")
            stats = Stats(
                total_jobs=len(jobs),
                processed_jobs=sum(job.status == "completed" for job in jobs),
                totals=Counts(),
                title_api_calls=sum(job.title_api_calls for job in jobs),
                title_prompt_tokens=sum(job.title_prompt_tokens for job in jobs),
                title_completion_tokens=sum(job.title_completion_tokens for job in jobs),
                title_shortfall=sum(job.title_shortfall for job in jobs),
                title_cost_usd=sum(job.title_cost_usd for job in jobs),
            )
            for job in jobs:  # every tier of the spec appears, even one with no record yet
                for tier in job.spec.get("tiers", []):  # the JobSpec message's JSON form
                    stats.tiers[(job.id, tier["name"])] = Counts(requested=int(tier["count"]))
            for row in repository.article_totals(uow.session, [job.id for job in jobs]):
                counts = stats.tiers.setdefault((row.job_id, row.tier), Counts())
                setattr(counts, row.status, getattr(counts, row.status) + row.records)
                counts.api_calls += row.api_calls
                counts.prompt_tokens += row.prompt_tokens
                counts.completion_tokens += row.completion_tokens
                counts.cost_usd += row.cost_usd
                counts.rate_limited += row.rate_limited
                if row.status not in ("failed", "skipped"):
                    counts.words += row.words
            for counts in stats.tiers.values():
                stats.totals.add(counts)
            return stats

    def word_samples(self, model: str, limit: int) -> list[tuple[int, int]]:
        """(asked, delivered) words of the model's latest `limit` drafts, oldest first."""
        if not model:
            raise InvalidRecordError("model: must not be empty")
        with self._uow() as uow:
            return repository.word_samples(uow.session, model, max(1, min(limit, 1000)))

    # Users ----------------------------------------------------------------------------------

    def ensure_admin(self, password: str | None) -> str | None:
        """Create the `admin` user if no admin exists. Returns the password when it had to be
        generated (the caller shows it once), else None. Never logs a password."""
        with self._uow() as uow:
            if repository.admin_exists(uow.session):
                return None
            generated = None if password else generate_password()
            secret = password or generated or ""
            uow.session.add(
                User(
                    username="admin",
                    password_hash=_hasher.hash(secret),
                    role="admin",
                )
            )
            try:
                uow.commit()
            except IntegrityError:
                return None  # another replica created it first
            log.info("created the admin user")
            return generated

    def create_user(self, username: str, password: str, role: str = "user") -> User:
        """A new active user with an argon2 hash of `password`; ConflictError when the name is
        taken."""
        check_username(username)
        check_password(password)
        if role not in accounts.ROLES:
            raise InvalidRecordError(
                f"role: must be one of {', '.join(accounts.ROLES)}, not {role!r}"
            )
        with self._hashes.slot():  # before the session: a wait holds no connection
            password_hash = _hasher.hash(password)
        with self._uow() as uow:
            user = User(username=username, password_hash=password_hash, role=role)
            uow.session.add(user)
            try:
                uow.commit()
            except IntegrityError as e:
                raise ConflictError(f"user {username!r} already exists") from e
            return user

    def get_user(self, username: str) -> User:
        """One user by name, active or not; NotFoundError otherwise."""
        with self._uow() as uow:
            return self._user(uow.session, username)

    def token_holder(self, username: str, token_id: str) -> tuple[User, bool]:
        """The user a session token names, and whether Logout revoked that token: both in the
        one call to persistence that every request with a token makes."""
        with self._uow() as uow:
            return self._user(uow.session, username), repository.token_revoked(
                uow.session, token_id
            )

    def revoke_token(self, token_id: str, username: str, expires_at: datetime) -> None:
        """Refuse this session token from now until it expires; revocations of tokens that
        expired anyway are dropped on the way. Revoking it again changes nothing."""
        if not 1 <= len(token_id) <= 64:
            raise InvalidRecordError("token_id: 1-64 characters")
        with self._uow() as uow:
            repository.prune_revoked_tokens(uow.session, utcnow())
            if not repository.token_revoked(uow.session, token_id):
                uow.session.add(
                    RevokedToken(token_id=token_id, username=username, expires_at=expires_at)
                )
            # Revoked at the same moment by another call: revoked all the same.
            with contextlib.suppress(IntegrityError):
                uow.commit()

    def list_users(self) -> Sequence[User]:
        """Every user, by name."""
        with self._uow() as uow:
            return repository.all_users(uow.session)

    def set_user_active(self, username: str, active: bool) -> User:
        """Enable or disable an account. StateError rather than disable the last active admin:
        nobody could manage users after that."""
        with self._uow() as uow:
            user = self._user(uow.session, username, for_update=True)
            last_admin = user.role == "admin" and repository.active_admins(uow.session) <= 1
            if not active and user.active and last_admin:
                raise StateError(f"{username!r} is the last active admin; make another admin first")
            user.active = active
            uow.commit()
            return user

    def set_password(self, username: str, password: str) -> User:
        """Replace a user's password (its argon2 hash); session tokens issued before stop
        working."""
        check_password(password)
        with self._hashes.slot():  # before the session: a wait holds no row lock
            password_hash = _hasher.hash(password)
        with self._uow() as uow:
            user = self._user(uow.session, username, for_update=True)
            user.password_hash = password_hash
            user.token_version += 1
            uow.commit()
            return user

    @staticmethod
    def _user(session: Session, username: str, for_update: bool = False) -> User:
        user = repository.user_by_name(session, username, for_update)
        if user is None:
            raise NotFoundError(f"user {username!r} does not exist")
        return user

    # Secrets --------------------------------------------------------------------------------

    def stored_secret(self, name: str) -> str:
        """The secret stored under `name`, generated and stored by the first caller. Concurrent
        first callers all get the one that was stored."""
        for _attempt in range(2):
            with self._uow() as uow:
                found = uow.session.get(StoredSecret, name)
                if found is not None:
                    return found.value
                value = secrets.token_urlsafe(48)
                uow.session.add(StoredSecret(name=name, value=value))
                try:
                    uow.commit()
                    log.info("generated and stored the secret %r", name)  # its name, not value
                    return value
                except IntegrityError:
                    continue  # another replica stored one first: read theirs
        raise StateError(f"secret {name!r}: could not be stored")

    def verify_credentials(self, username: str, password: str) -> User:
        """The active user with these credentials; AuthenticationError otherwise (the message
        does not say which part was wrong), BusyError when the hash waited too long for a
        slot. The hash runs after the session is closed: a queue of logins holds no database
        connection."""
        with self._uow() as uow:
            user = repository.user_by_name(uow.session, username)
        with self._hashes.slot():
            if user is None or not user.active or accounts.password_problem(password):
                _hasher.hash(_TIMING_PASSWORD)  # spend the same time as a real check
                raise AuthenticationError("invalid username or password")
            try:
                _hasher.verify(user.password_hash, password)
            except (VerificationError, InvalidHashError) as e:
                raise AuthenticationError("invalid username or password") from e
        return user
