"""JobPublisher: a job's post-processing, in order, once every article of the job has its terminal
record: URLs → interlinking → templating → export. Each step reports what it made as a
PostProcessingStep; a step that fails reports its error and the later steps do not run (the
articles stay stored either way, and `tierwriter jobs publish` runs it all again).

A publication runs under the job's lease epoch: its URLs, pages and files are stored with it
(persistence refuses a stale epoch: LeaseLostError, and the caller's run is over), its files are
written into the run's own folder, which becomes OUTPUT_DIR/<job id> only if no newer run's is
shown (run_folder). The database keeps every file (the pages in their records, the rest as
job files), so any orchestrator serves `jobs export`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import jinja2

from orchestrator_service import interlink, publish, report, run_folder
from orchestrator_service.interlink import Published
from orchestrator_service.jobfile import JobSpec
from orchestrator_service.run_folder import OutputWriteError, write_atomically
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
    path: Path = field(default_factory=Path)  # where it is shown: OUTPUT_DIR/<job>/<site>/…


def tier_number(tier: str) -> int:
    """tier1 → 1."""
    return int(tier.removeprefix("tier"))


class LeaseLostError(Exception):
    """Persistence refused the publication's lease epoch: another run holds the job now, and
    this one must write nothing more."""


def lease_lost(error: ServiceCallError) -> bool:
    """Whether a persistence call was refused for a stale lease epoch (ABORTED)."""
    return error.service == "persistence_service" and error.code == grpc.StatusCode.ABORTED


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

    def publish(self, job_id: int, lease_epoch: int) -> Iterator[pb.PostProcessingStep]:
        """The four steps' reports, in order, under the job's lease epoch `lease_epoch`; stops
        after a step that failed. LeaseLostError once persistence refuses the epoch."""
        try:
            yield from self._publish(job_id, lease_epoch)
        except LeaseLostError:
            run_folder.discard_run(self._output_root, job_id, lease_epoch)
            raise

    def _publish(self, job_id: int, epoch: int) -> Iterator[pb.PostProcessingStep]:
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
            pages, detail = self._urls(job_id, successful, epoch)
            return len(pages), detail

        steps = [
            (pb.POST_STEP_URLS, urls),
            (pb.POST_STEP_LINKS, lambda: self._links(spec, project, pages)),
            (pb.POST_STEP_TEMPLATES, lambda: self._templates_of(pages, template_sets, templates)),
            (
                pb.POST_STEP_EXPORT,
                lambda: self._export(job, epoch, spec, project, pages, templates, records),
            ),
        ]
        for step, run in steps:
            step_report = pb.PostProcessingStep(job_id=job_id, step=step)
            if step == pb.POST_STEP_URLS:
                step_report.skipped.extend(skipped)
            try:
                step_report.count, step_report.detail = run()
            except ServiceCallError as e:
                if lease_lost(e):
                    raise LeaseLostError(str(e)) from e
                log.exception("job %d: post-processing failed", job_id)
                step_report.error = (
                    f"failed: {type(e).__name__}: {e}; the articles are stored, "
                    f"`tierwriter jobs publish {job_id}` runs it again"
                )
                yield step_report
                return
            except (OSError, jinja2.TemplateError, ValueError) as e:
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

    def _urls(
        self, job_id: int, articles: list[db_pb.Article], epoch: int
    ) -> tuple[list[_Page], str]:
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
                    self._persistence.set_urls(job_id, new, epoch)
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
        self,
        job_id: int,
        epoch: int,
        pages: list[_Page],
        templates: dict[tuple[str, str], jinja2.Template],
    ) -> None:
        """Each page rendered with its links and written into the run's folder, its record told
        where it is shown and what it holds: the records' text read a page of records at a time,
        so a job of any size fits in memory."""
        folder = run_folder.run_dir(self._output_root, job_id, epoch)
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
                relative = publish.page_path(site, page.published.slug)
                page.path = publish.job_dir(self._output_root, job_id) / relative
                write_atomically(folder / relative, rendered.html)
                batch.append(
                    db_pb.ArticlePublication(
                        article_id=record.id, output_path=str(page.path), html=rendered.html
                    )
                )
                batch_bytes += len(rendered.html)
                if batch_bytes >= PUBLICATION_BATCH_BYTES:  # one commit per batch, not per page
                    self._persistence.set_publications(job_id, batch, epoch)
                    batch, batch_bytes = [], 0
        if batch:
            self._persistence.set_publications(job_id, batch, epoch)

    def _export(
        self,
        job: db_pb.Job,
        epoch: int,
        spec: JobSpec,
        project: db_pb.Project,
        pages: list[_Page],
        templates: dict[tuple[str, str], jinja2.Template],
        records: list[db_pb.Article],
    ) -> tuple[int, str]:
        job_id = job.id
        folder = run_folder.run_dir(self._output_root, job_id, epoch)
        self._write_pages(job_id, epoch, pages, templates)
        files: dict[str, str] = {}  # the job's files but its pages, by path inside its folder
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
            files[f"{site_pages[0].path.parent.name}/index.html"] = index
        # Each tier's titles, from the database: the copy written as the tier ran may be
        # missing (the disk was full then) or out of date (a resume).
        for tier in job.titles:
            files[publish.titles_name(tier.tier)] = "".join(f"{t}\n" for t in tier.titles)
        job_dir = publish.job_dir(self._output_root, job_id)
        files["index.html"] = publish.render_job_index(
            self._templates,
            job_id=job_id,
            project=project.name,
            money_site_url=project.money_site_url,
            sites=[(site, len(site_pages)) for site, site_pages in sorted(by_site.items())],
            titles_files=sorted(publish.titles_name(t.tier) for t in job.titles),
            report=self._report(job, spec, project, pages, records, job_dir),
        )
        for path, text in files.items():
            write_atomically(folder / path, text)
        self._persistence.set_job_files(
            job_id, {path: text.encode() for path, text in files.items()}, epoch
        )
        shown = publish.job_dir(self._shown_root, job_id)
        if not run_folder.link_run(self._output_root, job_id, epoch):
            raise LeaseLostError(f"job {job_id}: a newer run of the job published it first")
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
                    name, tier.count, c.generated, c.augmented, c.short, c.long, c.failed,
                    c.skipped,
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


def stored_files(persistence: PersistenceClient, job_id: int) -> Iterator[tuple[str, bytes]]:
    """A job's published files as the database keeps them, (path inside the job's folder,
    bytes): every page from its record (the final HTML post-processing wrote), read a page of
    records at a time, then the site indexes, title lists and the job's index."""
    for records in persistence.article_pages(job_id):
        for record in records:
            if record.url and record.html:
                path = publish.page_path(record.site, publish.slug_of(record.url))
                yield path, record.html.encode()
    for stored in persistence.job_files(job_id):
        yield stored.path, stored.content
