"""JobPublisher: a job's post-processing, in order, once every article of the job has its terminal
record: URLs → interlinking → templating → export. Each step reports what it made as a
PostProcessingStep; a step that fails reports its error and the later steps do not run (the
articles stay stored either way, and `tierwriter jobs publish` runs it all again)."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jinja2

from orchestrator_service import export, interlink, publish, report
from orchestrator_service.interlink import Published
from orchestrator_service.jobfile import JobSpec
from persistence_service.client import PersistenceClient
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError

log = logging.getLogger(__name__)

# Another job on the same site may take a slug between our read of the taken URLs and our write;
# with many jobs finishing at once (server-owned jobs run side by side), that can happen a few
# times in a row.
URL_ATTEMPTS = 10
# Pages recorded per SetArticlePublications call: about this many bytes of HTML, well below
# gRPC's 4 MiB message limit.
PUBLICATION_BATCH_BYTES = 1024 * 1024


@dataclass
class _Page:
    """One successful article on its way to a file. Only its metadata stays in memory: its
    text is read a page of records at a time while the files are written."""

    record: db_pb.Article  # without content and html
    published: Published
    links: list[interlink.Link] = field(default_factory=list)
    description: str = ""  # the page's meta description, for the site's index
    path: Path = field(default_factory=Path)


def tier_number(tier: str) -> int:
    """tier1 → 1."""
    return int(tier.removeprefix("tier"))


class JobPublisher:
    """Runs a job's post-processing. Thread-safe: the state of a run lives in the run."""

    def __init__(
        self,
        persistence: PersistenceClient,
        templates: jinja2.Environment,
        output_root: Path,
        shown_root: Path | None = None,
    ) -> None:
        self._persistence = persistence
        self._templates = templates
        self._output_root = output_root
        self._shown_root = shown_root or output_root  # where the user finds output_root

    def publish(self, job_id: int) -> Iterator[pb.PostProcessingStep]:
        """The four steps' reports, in order; stops after a step that failed."""
        job = self._persistence.get_job(job_id)
        spec = JobSpec.from_proto(job.spec)
        project = self._persistence.get_project(job.project_id)
        records = sorted(
            self._persistence.list_articles(job_id, metadata_only=True),
            key=lambda a: (tier_number(a.tier), a.article_index),
        )
        skipped = [
            pb.SkippedArticle(
                tier=a.tier,
                article_index=a.article_index,
                reason=f"failed at {a.error_stage}: {a.error}",
            )
            for a in records
            if a.status == article_pb.ARTICLE_STATUS_FAILED
        ]
        successful = [a for a in records if a.status != article_pb.ARTICLE_STATUS_FAILED]
        template_sets = {s.hostname: s.template for s in self._persistence.list_sites()}
        pages: list[_Page] = []
        templates: dict[tuple[str, str], jinja2.Template] = {}  # (site, file) → template

        def urls() -> tuple[int, str]:
            nonlocal pages
            pages, detail = self._urls(job_id, successful)
            return len(pages), detail

        steps = [
            (pb.POST_STEP_URLS, urls),
            (pb.POST_STEP_LINKS, lambda: self._links(spec, project, pages)),
            (pb.POST_STEP_TEMPLATES, lambda: self._templates_of(pages, template_sets, templates)),
            (
                pb.POST_STEP_EXPORT,
                lambda: self._export(job, spec, project, pages, templates, records),
            ),
        ]
        for step, run in steps:
            step_report = pb.PostProcessingStep(job_id=job_id, step=step)
            if step == pb.POST_STEP_URLS:
                step_report.skipped.extend(skipped)
            try:
                step_report.count, step_report.detail = run()
            except (ServiceCallError, OSError, jinja2.TemplateError, ValueError) as e:
                log.exception("job %d: post-processing failed", job_id)
                step_report.error = (
                    f"failed: {type(e).__name__}: {e}; the articles are stored, "
                    f"`tierwriter jobs publish {job_id}` runs it again"
                )
                yield step_report
                return
            except OutputWriteError as e:  # not a bug: the disk, for the user to fix
                log.error("job %d: post-processing failed: %s", job_id, e)
                problem = e.seen_from(self._output_root, self._shown_root)
                step_report.error = (
                    f"failed: {problem}; the articles are stored: once that is fixed, "
                    f"`tierwriter jobs publish {job_id}` finishes it"
                )
                yield step_report
                return
            yield step_report

    # URLs -----------------------------------------------------------------------------------

    def _urls(self, job_id: int, articles: list[db_pb.Article]) -> tuple[list[_Page], str]:
        """Every successful article's URL. A URL stored before (an earlier run of this job) is
        kept, so URLs are stable across a resume or a re-publish; new slugs avoid every slug
        already used on the site, by this job or another."""
        kept = {a.id: a.url for a in articles if a.url}
        new: dict[int, str] = {}
        for attempt in range(1, URL_ATTEMPTS + 1):
            taken: dict[str, set[str]] = {}
            sites = sorted({a.site for a in articles})
            for url in self._persistence.taken_urls(sites, job_id) if sites else []:
                site = url.split("/")[2] if url.startswith("https://") else ""
                taken.setdefault(site, set()).add(publish.slug_of(url))
            for a in articles:
                if a.id in kept:
                    taken.setdefault(a.site, set()).add(publish.slug_of(kept[a.id]))
            slugs = publish.assign_slugs(
                [(a.id, a.site, a.title) for a in articles if a.id not in kept], taken
            )
            new = {
                a.id: publish.article_url(a.site, slugs[a.id]) for a in articles if a.id in slugs
            }
            try:
                if new:
                    self._persistence.set_urls(job_id, new)
                break
            except ServiceCallError as e:
                if e.code != grpc.StatusCode.ALREADY_EXISTS or attempt == URL_ATTEMPTS:
                    raise
        urls = {**kept, **new}
        pages = [
            _Page(
                a,
                Published(
                    a.id,
                    tier_number(a.tier),
                    a.site,
                    publish.slug_of(urls[a.id]),
                    urls[a.id],
                    a.title,
                ),
            )
            for a in articles
        ]
        detail = f"{len(new)} new" + (f", {len(kept)} kept from an earlier run" if kept else "")
        return pages, detail

    # Interlinking ---------------------------------------------------------------------------

    def _links(self, spec: JobSpec, project: db_pb.Project, pages: list[_Page]) -> tuple[int, str]:
        tiers: dict[int, list[Published]] = {tier_number(name): [] for name in spec.tiers}
        for page in pages:
            tiers.setdefault(page.published.tier, []).append(page.published)
        anchors = interlink.AnchorTexts(
            project.main_keyword, list(project.entities), list(project.related_searches)
        )
        plan = interlink.plan_links(
            tiers, project.money_site_url, anchors, spec.link_style, spec.see_also_links
        )
        by_source: dict[int, list[interlink.Link]] = {}
        for link in plan.links:
            by_source.setdefault(link.source_id, []).append(link)
        for page in pages:  # placed in the text when the page is written (export)
            page.links = by_source.get(page.record.id, [])
        parts = [
            f"{plan.count('money')} to the money site",
            f"{plan.count('up')} up a tier",
        ]
        if spec.see_also_links:
            parts.append(f"{plan.count('see_also')} see-also")
        return len(plan.links), "; ".join([", ".join(parts), *plan.notes])

    # Templating -----------------------------------------------------------------------------

    def _templates_of(
        self,
        pages: list[_Page],
        template_sets: dict[str, str],
        templates: dict[tuple[str, str], jinja2.Template],
    ) -> tuple[int, str]:
        """Each site's article and index templates, loaded and compiled into `templates` (a
        template with an error fails here, before any file is written); the pages render as
        they are written."""
        missing = sorted(
            {
                f"{site} ({name})"
                for site, name in template_sets.items()
                if name and not publish.has_template_set(self._templates, name)
            }
        )
        for site in {page.published.site for page in pages}:
            for name in (publish.ARTICLE_TEMPLATE, publish.INDEX_TEMPLATE):
                templates[site, name] = publish.site_template(
                    self._templates, template_sets.get(site, ""), name
                )
        used = sorted({template_sets.get(p.published.site, "") or "default" for p in pages})
        detail = f"template sets: {', '.join(used) or 'none'}"
        if missing:
            detail += f"; not found in TEMPLATES_DIR, default used: {', '.join(missing)}"
        return len(pages), detail

    # Export ---------------------------------------------------------------------------------

    def _write_pages(
        self, job_id: int, pages: list[_Page], templates: dict[tuple[str, str], jinja2.Template]
    ) -> None:
        """Each page rendered with its links and written, its record told where and what: the
        records' text read a page of records at a time, so a job of any size fits in memory."""
        wanted = {page.record.id: page for page in pages}
        batch: list[db_pb.ArticlePublication] = []
        batch_bytes = 0
        for records in self._persistence.article_pages(job_id):
            for record in records:
                page = wanted.get(record.id)
                if page is None:  # a failed record: no page
                    continue
                site = page.published.site
                rendered = publish.render_article(
                    templates[site, publish.ARTICLE_TEMPLATE],
                    title=record.title,
                    body=interlink.place_links(record.content, page.links, seed=record.id),
                    keyword=record.keyword,
                    site=site,
                    url=page.published.url,
                    tier=record.tier,
                )
                page.description = rendered.description
                page.path = publish.output_path(
                    self._output_root, job_id, site, page.published.slug
                )
                write_atomically(page.path, rendered.html)
                batch.append(
                    db_pb.ArticlePublication(
                        article_id=record.id, output_path=str(page.path), html=rendered.html
                    )
                )
                batch_bytes += len(rendered.html)
                if batch_bytes >= PUBLICATION_BATCH_BYTES:  # one commit per batch, not per page
                    self._persistence.set_publications(batch)
                    batch, batch_bytes = [], 0
        if batch:
            self._persistence.set_publications(batch)

    def _export(
        self,
        job: db_pb.Job,
        spec: JobSpec,
        project: db_pb.Project,
        pages: list[_Page],
        templates: dict[tuple[str, str], jinja2.Template],
        records: list[db_pb.Article],
    ) -> tuple[int, str]:
        job_id = job.id
        root = self._output_root
        self._write_pages(job_id, pages, templates)
        by_site: dict[str, list[_Page]] = {}
        for page in pages:
            by_site.setdefault(page.published.site, []).append(page)
        for site, site_pages in by_site.items():
            entries = [
                publish.IndexEntry(
                    title=p.record.title,
                    href=p.path.name,
                    description=p.description,
                    tier=p.record.tier,
                )
                for p in site_pages
            ]
            index = publish.render_index(
                templates[site, publish.INDEX_TEMPLATE],
                site=site,
                keyword=project.main_keyword,
                entries=entries,
            )
            write_atomically(site_pages[0].path.parent / "index.html", index)
        job_dir = publish.job_dir(root, job_id)
        # Each tier's titles, from the database: the copy written as the tier ran may be
        # missing (the disk was full then) or out of date (a resume).
        for tier in job.titles:
            write_atomically(
                publish.titles_path(root, job_id, tier.tier),
                "".join(f"{title}\n" for title in tier.titles),
            )
        titles_files = sorted(p.name for p in job_dir.glob("titles-*.txt"))
        write_atomically(
            job_dir / "index.html",
            publish.render_job_index(
                self._templates,
                job_id=job_id,
                project=project.name,
                money_site_url=project.money_site_url,
                sites=[(site, len(site_pages)) for site, site_pages in sorted(by_site.items())],
                titles_files=titles_files,
                report=self._report(job, spec, project, pages, records, job_dir),
            ),
        )
        shown = publish.job_dir(self._shown_root, job_id)
        return len(pages), f"{len(by_site)} site indexes, under {shown}/"

    def _report(
        self,
        job: db_pb.Job,
        spec: JobSpec,
        project: db_pb.Project,
        pages: list[_Page],
        records: list[db_pb.Article],
        job_dir: Path,
    ) -> report.JobReport:
        """What the job's index shows of the run: its numbers from the database, the word
        counts and failures from its records, the link graph from the links placed."""
        stats = self._persistence.job_stats([job.id])
        counts = {t.tier: t.counts for t in stats.tiers}
        tiers = []
        for name, tier in spec.ordered_tiers():
            c = counts.get(name, db_pb.ArticleCounts())
            words = [
                a.word_count
                for a in records
                if a.tier == name and a.status != article_pb.ARTICLE_STATUS_FAILED and a.word_count
            ]
            tiers.append(
                report.TierReport(
                    name, tier.count, c.generated, c.augmented, c.short, c.failed, c.skipped,
                    c.cost_usd, tier.min_word_count, tier.max_word_count, words,
                    report.word_histogram(words, tier.min_word_count, tier.max_word_count),
                )
            )  # fmt: skip
        failed = [
            report.FailedEntry(a.tier, a.article_index + 1, a.title, a.error_stage, a.error)
            for a in records
            if a.status == article_pb.ARTICLE_STATUS_FAILED
        ]
        graph = report.link_graph(
            project.money_site_url,
            [
                report.GraphPage(
                    p.record.id,
                    p.published.tier,
                    p.record.title,
                    os.path.relpath(p.path, job_dir),
                )
                for p in pages
            ],
            [(link.source_id, link.target_id) for p in pages for link in p.links],
        )
        t = stats.totals
        return report.JobReport(
            tiers=tiers,
            failed=failed,
            link_graph=graph,
            links=sum(len(p.links) for p in pages),
            api_calls=t.api_calls + stats.title_api_calls,
            tokens=t.prompt_tokens + t.completion_tokens + stats.title_prompt_tokens
            + stats.title_completion_tokens,
            cost_usd=t.cost_usd + stats.title_cost_usd,
            submitted=job.create_time.ToDatetime(UTC),
            written=datetime.now(UTC),
        )  # fmt: skip


class OutputWriteError(Exception):
    """A file under OUTPUT_DIR could not be written; the message names the file and the cause
    in words a user acts on (the disk is full, permission denied, …)."""

    def __init__(self, path: Path, cause: OSError) -> None:
        self.path = path
        self.cause = _cause_of(cause)
        super().__init__(f"cannot write {path}: {self.cause}")

    def seen_from(self, root: Path, shown_root: Path) -> str:
        """The message with the path where the user finds it: under `shown_root`
        (PUBLIC_OUTPUT_DIR, e.g. the host folder a container's OUTPUT_DIR is mounted from)."""
        try:
            path = shown_root / self.path.relative_to(root)
        except ValueError:
            path = self.path
        return f"cannot write {path}: {self.cause}"


# What a user does about each: free space, fix the owner/mode, remount; the rest in the OS's words.
_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def _cause_of(error: OSError) -> str:
    reason = error.strerror or type(error).__name__
    cause = _CAUSES.get(error.errno or 0)
    return f"{cause} ({reason})" if cause else reason


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written page is ever seen.
    OutputWriteError, naming `path`, when the disk or its permissions refuse."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputWriteError(path, e) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, export.PAGE_MODE)  # mkstemp makes it its owner's only
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputWriteError(path, e) from e
        raise
