"""Queries over one session. Repositories never commit; the unit of work does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, delete, func, or_, select, text, tuple_, update
from sqlalchemy.orm import Session, defer

from persistence_service.models import (
    Article,
    Job,
    JobEvent,
    JobFile,
    Project,
    RateBucket,
    RateHolder,
    RevokedToken,
    Site,
    User,
    utcnow,
)
from persistence_service.models import Quota as QuotaRow


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def database_now(session: Session) -> datetime:
    """Now by the database's clock, which every service on it shares: leases are timed by it,
    not by any service's clock. On PostgreSQL clock_timestamp(), the moment of the call rather
    than of the transaction's start. SQLite is a file this process opens, so its clock is this
    process's."""
    if _postgresql(session):
        moment = session.scalar(select(func.clock_timestamp()))
        assert isinstance(moment, datetime)
        return moment.astimezone(UTC)
    return utcnow()


def database_seconds(session: Session) -> float:
    """database_now as seconds since the epoch."""
    return database_now(session).timestamp()


def _take_sqlite_write_lock(session: Session, job_id: int) -> None:
    """On SQLite, take the database's write lock now with a write that changes nothing: its
    driver begins a transaction only at the first write, so a job read before one could change
    under us (a claim raising its epoch) before our own write lands."""
    if not _postgresql(session):
        session.execute(update(Job).where(Job.id == job_id).values(id=Job.id))


def project_by_name(session: Session, owner: str, name: str) -> Project | None:
    """The owner's project with this name (unique per owner), if any."""
    query = select(Project).where(Project.owner == owner, Project.name == name)
    return session.scalars(query).one_or_none()


def projects_of(session: Session, owner: str) -> Sequence[Project]:
    """The owner's projects (everyone's when `owner` is empty), by name."""
    query = select(Project).order_by(Project.name, Project.owner)
    if owner:
        query = query.where(Project.owner == owner)
    return session.scalars(query).all()


def jobs_of_project(session: Session, project_id: int) -> Sequence[Job]:
    """The project's jobs, oldest first."""
    return session.scalars(select(Job).where(Job.project_id == project_id).order_by(Job.id)).all()


def sites_by_hostname(session: Session, sites: Sequence[tuple[str, str]]) -> Sequence[Site]:
    """The stored sites among the (hostname, template) pairs."""
    hostnames = [hostname for hostname, _ in sites]
    return session.scalars(select(Site).where(Site.hostname.in_(hostnames))).all()


def sites_of(session: Session, owner: str, hostnames: Sequence[str] = ()) -> Sequence[Site]:
    """The owner's sites (everyone's when `owner` is empty), only those of `hostnames` when
    given, by hostname."""
    query = select(Site).order_by(Site.hostname)
    if owner:
        query = query.where(Site.owner == owner)
    if hostnames:
        query = query.where(Site.hostname.in_(hostnames))
    return session.scalars(query).all()


def site_by_hostname(session: Session, hostname: str, for_update: bool = False) -> Site | None:
    """The site with this hostname, if any."""
    query = select(Site).where(Site.hostname == hostname)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


# An article's large columns: what a listing of a whole job leaves out.
_TEXT = (Article.content, Article.html, Article.outline, Article.error_traceback)


def articles_by_ids(session: Session, article_ids: Sequence[int]) -> Sequence[Article]:
    """The records with these ids, for setting their URL or page: without their text, which
    for a whole job of thousands would be loaded for nothing (read on access)."""
    query = select(Article).where(Article.id.in_(article_ids))
    return session.scalars(query.options(*(defer(column) for column in _TEXT))).all()


def urls_on_sites(session: Session, hostnames: Sequence[str], exclude_job_id: int) -> list[str]:
    """URLs other jobs' records hold on these sites."""
    query = select(Article.url).where(
        Article.site.in_(hostnames), Article.url != "", Article.job_id != exclude_job_id
    )
    return list(session.scalars(query))


def article_by_key(session: Session, job_id: int, tier: str, article_index: int) -> Article | None:
    """The record for (job, tier, index), if any: the key of invariant 1."""
    return session.scalars(
        select(Article).where(
            Article.job_id == job_id, Article.tier == tier, Article.article_index == article_index
        )
    ).one_or_none()


def articles_by_keys(
    session: Session, keys: Sequence[tuple[int, str, int]]
) -> dict[tuple[int, str, int], Article]:
    """The stored records among these (job, tier, index) keys, by key."""
    if not keys:
        return {}
    key = tuple_(Article.job_id, Article.tier, Article.article_index)
    found = session.scalars(select(Article).where(key.in_(set(keys))))
    return {(a.job_id, a.tier, a.article_index): a for a in found}


def articles_of_job(
    session: Session,
    job_id: int,
    tier: str = "",
    after: tuple[str, int] | None = None,
    limit: int | None = None,
    metadata_only: bool = False,
    status: str = "",
) -> Sequence[Article]:
    """A job's records in (tier, index) order, optionally of one tier or one status, after the
    record with the (tier, index) `after`, at most `limit`; without their text (content, html,
    outline, traceback) for `metadata_only` (those attributes then raise when read)."""
    query = select(Article).where(Article.job_id == job_id)
    if tier:
        query = query.where(Article.tier == tier)
    if status:
        query = query.where(Article.status == status)
    if after is not None:
        tier_after, index_after = after
        query = query.where(
            or_(
                Article.tier > tier_after,
                and_(Article.tier == tier_after, Article.article_index > index_after),
            )
        )
    if metadata_only:
        query = query.options(*(defer(column, raiseload=True) for column in _TEXT))
    query = query.order_by(Article.tier, Article.article_index).limit(limit)
    return session.scalars(query).all()


def jobs_with_status(session: Session, status: str) -> Sequence[Job]:
    """The jobs in this status, oldest first."""
    return session.scalars(select(Job).where(Job.status == status).order_by(Job.id)).all()


_CLAIM_LOCK_KEY = 7_305_119  # PostgreSQL advisory lock that serializes ClaimJobs


def lock_claims(session: Session) -> None:
    """Serialize job claims until the transaction ends, so two orchestrators never take the
    same job or pass a user's limit together. SQLite serializes writers by itself."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CLAIM_LOCK_KEY})


def job_under_lease(session: Session, job_id: int, exclusive: bool = False) -> Job | None:
    """The job, held so that no claim can raise its lease epoch before this transaction ends. On
    PostgreSQL a row lock: shared, so saves for one job still run side by side while a claim
    waits for them, or `exclusive` for a write that changes the job's row itself (two shared
    holders both upgrading would deadlock). On SQLite the write lock. A write checked against
    the epoch read here is fenced."""
    if _postgresql(session):
        return session.get(Job, job_id, with_for_update=True if exclusive else {"read": True})
    _take_sqlite_write_lock(session, job_id)
    return session.get(Job, job_id)


def jobs_with_expired_lease(session: Session, now: datetime, limit: int) -> Sequence[Job]:
    """Running jobs nobody holds a live lease on (their orchestrator is gone), oldest first."""
    return session.scalars(
        select(Job)
        .where(
            Job.status == "running",
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
        )
        .order_by(Job.id)
        .limit(limit)
    ).all()


def running_jobs_per_user(session: Session) -> dict[str, int]:
    """How many jobs each user has running."""
    rows = session.execute(
        select(Job.owner, func.count()).where(Job.status == "running").group_by(Job.owner)
    )
    return {owner: count for owner, count in rows}


def projects_with_running_jobs(session: Session) -> set[int]:
    """Projects that have a job running."""
    return set(session.scalars(select(Job.project_id).where(Job.status == "running").distinct()))


def leased_jobs(session: Session, owner: str, leases: dict[int, int]) -> list[Job]:
    """Of these jobs ({job id: lease epoch}), the running ones whose lease `owner` holds under
    that epoch, locked so that no claim takes one between this check and the caller's write."""
    if not leases:
        return []
    query = select(Job).where(Job.id.in_(leases), Job.lease_owner == owner, Job.status == "running")
    if _postgresql(session):
        query = query.with_for_update()
    else:
        _take_sqlite_write_lock(session, next(iter(leases)))
    return [job for job in session.scalars(query) if job.lease_epoch == leases[job.id]]


def event_seqs(session: Session, job_id: int, first: int, last: int) -> set[int]:
    """The sequence numbers stored for a job between `first` and `last`."""
    return set(
        session.scalars(
            select(JobEvent.seq).where(
                JobEvent.job_id == job_id, JobEvent.seq >= first, JobEvent.seq <= last
            )
        )
    )


def events_after(session: Session, job_id: int, after_seq: int, limit: int) -> Sequence[JobEvent]:
    """A job's events after `after_seq`, in order."""
    return session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
        .order_by(JobEvent.seq)
        .limit(limit)
    ).all()


def recent_jobs(session: Session, limit: int, owner: str = "") -> Sequence[Job]:
    """The owner's jobs (everyone's when `owner` is empty), newest first."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if owner:
        query = query.where(Job.owner == owner)
    return session.scalars(query).all()


def jobs_by_ids(session: Session, job_ids: Sequence[int]) -> Sequence[Job]:
    """The jobs with these ids, in id order."""
    return session.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id)).all()


def user_by_name(session: Session, username: str, for_update: bool = False) -> User | None:
    """The user with this unique name, if any."""
    query = select(User).where(User.username == username)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).one_or_none()


def token_revoked(session: Session, token_id: str) -> bool:
    """Whether Logout revoked the session token with this id."""
    return session.get(RevokedToken, token_id) is not None


def prune_revoked_tokens(session: Session, now: datetime) -> None:
    """Forget revocations of tokens that have expired anyway."""
    session.execute(delete(RevokedToken).where(RevokedToken.expires_at < now))


def all_users(session: Session) -> Sequence[User]:
    """Every user, by name."""
    return session.scalars(select(User).order_by(User.username)).all()


def active_admins(session: Session) -> int:
    """How many admin accounts are active."""
    query = select(func.count(User.id)).where(User.role == "admin", User.active.is_(True))
    return int(session.scalar(query) or 0)


def admin_exists(session: Session) -> bool:
    """Whether any admin account exists."""
    return session.scalars(select(User.id).where(User.role == "admin").limit(1)).first() is not None


@dataclass(frozen=True)
class StatusRow:
    """Aggregates of one (job, tier, status) group of records."""

    job_id: int
    tier: str
    status: str
    records: int
    api_calls: int
    prompt_tokens: int
    completion_tokens: int
    words: int
    cost_usd: float
    rate_limited: int


def article_totals(session: Session, job_ids: Sequence[int]) -> list[StatusRow]:
    """Counts and sums grouped by (job, tier, status), straight from the records."""
    query = (
        select(
            Article.job_id,
            Article.tier,
            Article.status,
            func.count(Article.id),
            func.coalesce(func.sum(Article.api_calls), 0),
            func.coalesce(func.sum(Article.prompt_tokens), 0),
            func.coalesce(func.sum(Article.completion_tokens), 0),
            func.coalesce(func.sum(Article.word_count), 0),
            func.coalesce(func.sum(Article.cost_usd), 0.0),
            func.coalesce(func.sum(Article.rate_limited), 0),
        )
        .where(Article.job_id.in_(job_ids))
        .group_by(Article.job_id, Article.tier, Article.status)
    )
    return [
        StatusRow(
            job_id=row[0],
            tier=row[1],
            status=row[2],
            records=int(row[3]),
            api_calls=int(row[4]),
            prompt_tokens=int(row[5]),
            completion_tokens=int(row[6]),
            words=int(row[7]),
            cost_usd=float(row[8]),
            rate_limited=int(row[9]),
        )
        for row in session.execute(query)
    ]


def word_samples(session: Session, model: str, limit: int) -> list[tuple[int, int]]:
    """(asked, delivered) words of the model's latest drafts, oldest first."""
    query = (
        select(Article.asked_words, Article.draft_words)
        .where(Article.content_model == model, Article.asked_words > 0, Article.draft_words > 0)
        .order_by(Article.id.desc())
        .limit(limit)
    )
    return [(int(asked), int(draft)) for asked, draft in session.execute(query)][::-1]


def job_files(
    session: Session, job_id: int, after: str = "", limit: int | None = None
) -> Sequence[JobFile]:
    """A job's stored files other than its pages, in path order, after the path `after`."""
    query = select(JobFile).where(JobFile.job_id == job_id, JobFile.path > after)
    return session.scalars(query.order_by(JobFile.path).limit(limit)).all()


def delete_job_files(session: Session, job_id: int) -> None:
    """Forget the job's stored files (a publication replaces them all)."""
    session.execute(delete(JobFile).where(JobFile.job_id == job_id))


def rate_bucket(session: Session, bucket: str) -> RateBucket | None:
    """A shared rate bucket, its row locked on PostgreSQL until the transaction ends (SQLite
    callers hold a lock of their own)."""
    return session.get(RateBucket, bucket, with_for_update=_postgresql(session))


def rate_holder(session: Session, bucket: str, holder: str) -> RateHolder | None:
    """One holder's row of a bucket, if it drew on it before."""
    return session.get(RateHolder, (bucket, holder))


def count_holders(session: Session, bucket: str, since: float) -> int:
    """Holders that drew on a bucket since `since` (database seconds)."""
    query = select(func.count()).where(RateHolder.bucket == bucket, RateHolder.seen >= since)
    return int(session.scalar(query) or 0)


def quota_of(session: Session, username: str) -> QuotaRow | None:
    """The user's own quota ("" for the default one), if one is set."""
    return session.get(QuotaRow, username)


def active_usage(session: Session, owner: str) -> tuple[int, int]:
    """(articles requested by the owner's queued and running jobs, their queued jobs)."""
    active = Job.owner == owner, Job.status.in_(("queued", "running"))
    articles = session.scalar(
        select(func.coalesce(func.sum(Job.requested_articles), 0)).where(*active)
    )
    queued = session.scalar(select(func.count()).where(Job.owner == owner, Job.status == "queued"))
    return int(articles or 0), int(queued or 0)


_SUBMIT_LOCK_KEY = 7_305_120  # with the username's hash: one user's submissions, one at a time


def lock_submissions(session: Session, username: str) -> None:
    """Serialize one user's submissions until the transaction ends, so two at once cannot pass
    a quota together: an advisory lock on PostgreSQL, the write lock on SQLite (through the
    user's row, which a submitter has)."""
    if _postgresql(session):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:k, hashtext(:u))"),
            {"k": _SUBMIT_LOCK_KEY, "u": username},
        )
    else:
        session.execute(
            update(User).where(User.username == username).values(username=User.username)
        )
