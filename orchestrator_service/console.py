"""How job events read on a terminal: the story's layout, one line per article step."""

from __future__ import annotations

from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.statuses import article_status_word

RULE = "=" * 60


def augmentation_rate(generated: int, augmented: int, short: int = 0, long: int = 0) -> float:
    """Share of the articles that got content which needed augmentation, whether it reached the
    minimum (augmented) or not (short); 0.0 when none got content."""
    written = generated + augmented + short + long
    return (augmented + short) / written if written else 0.0


def format_cost(usd: float) -> str:
    """$0.0123: four decimals below a dollar (single articles cost fractions of a cent)."""
    return f"${usd:,.4f}" if usd < 1 else f"${usd:,.2f}"


def _seconds(delay: float) -> str:
    """2.0 → "2s", 0.25 → "0.3s": how long a wait reads on the console."""
    return f"{round(delay, 1):g}s"


def _article_lines(a: article_pb.ArticleEvent) -> list[str]:
    prefix = f"[{a.tier}][{a.article_index + 1}/{a.tier_count}]"
    kinds = article_pb.ArticleEventKind
    # A kind this client does not know yet (a newer server) reads as its number.
    step = (
        kinds.Name(a.kind).removeprefix("ARTICLE_EVENT_KIND_") if a.kind in kinds.values() else ""
    )
    if step == "STARTED":
        lines = [f'{prefix} Using title: "{a.title}"']
        if a.site:
            lines.insert(0, f"{prefix} Assigned to site: {a.site}")
        return lines
    if step == "FAILED":
        # One line: the traceback is in the generator's log and `tierwriter jobs show ID --errors`.
        record = f"error record ID {a.article_id}" if a.article_id else "error record NOT saved"
        fatal = "; the API cannot serve this job: no further article starts" if a.fatal else ""
        return [f"{prefix} FAILED at {a.stage}: {a.error} ({record}){fatal}"]
    throttled = (
        f"Concurrency of {a.model} back to {a.concurrency_after}"
        if a.restored
        else f"Rate limited: concurrency of {a.model} {a.concurrency_before} → "
        f"{a.concurrency_after}"
    )
    outline_fix = f" ({a.outline_fix})" if a.outline_fix else ""
    status = article_status_word(a.status)
    saved = f"Saved (ID: {a.article_id}, Status: {status})"
    if status == "long" and a.error:
        saved += f": {a.error}"
    if a.quality_gates:
        saved += f" [gates: {a.quality_gates}]"
    short = ", still below the minimum (short)" if status == "short" else ""
    if short and a.error:  # the augmenting stopped on a failure: the draft was kept
        short += f": {a.error}"
    text = {
        "OUTLINE_STARTED": "Generating outline...",
        "OUTLINE_REPAIRING": f"Outline unusable ({a.error}), asking once more...",
        "RETRYING": f"API Error: {a.error}, retrying in {_seconds(a.retry_delay)}...",
        "RETRY_SUCCEEDED": "Retry successful",
        "OUTLINE_DONE": f"Generated outline: {a.h2_count} H2s, {a.h3_count} H3s{outline_fix}",
        "CONTENT_STARTED": "Generating content...",
        "CONTENT_DONE": f"Generated content: {a.word_count:,} words",
        "AUGMENTING": f"Below minimum ({a.min_word_count:,}), augmenting...",
        "AUGMENTED": f"Augmented content: {a.word_count:,} words{short}",
        "SAVED": saved,
        # A content reply is asked for again; an augmentation's or shortening's is not kept.
        "CONTENT_REJECTED": f"Content rejected ({a.error})"
        + (", asking once more..." if a.stage == "content" else f"; the {a.stage} not kept"),
        "SHORTENING": f"Over maximum ({a.word_count:,} of {a.max_word_count:,} words), "
        "shortening...",
        "SKIPPED": f"Skipped ({a.error})",
        "THROTTLED": throttled,
    }.get(step, f"step {a.kind}")
    return [f"{prefix} {text}"]


STEP_NAMES = {
    pb.POST_STEP_URLS: "URLs",
    pb.POST_STEP_LINKS: "Interlinking",
    pb.POST_STEP_TEMPLATES: "Templating",
    pb.POST_STEP_EXPORT: "Export",
}
STEP_UNITS = {
    pb.POST_STEP_URLS: "URLs",
    pb.POST_STEP_LINKS: "links placed",
    pb.POST_STEP_TEMPLATES: "pages to render, templates loaded",
    pb.POST_STEP_EXPORT: "pages written",
}


def post_processing_lines(step: pb.PostProcessingStep) -> list[str]:
    """One post-processing step: what it made, then each article it left out and why."""
    prefix = f"[post-processing] {STEP_NAMES.get(step.step, step.step)}"
    if step.error:
        lines = [f"{prefix}: {step.error}"]
    else:
        lines = [
            f"{prefix}: {step.count:,} {STEP_UNITS.get(step.step, '')}"
            + (f" ({step.detail})" if step.detail else "")
        ]
    lines += [
        f"[post-processing]   skipped {s.tier} article {s.article_index + 1}: {s.reason}"
        for s in step.skipped
    ]
    return lines


def summary_lines(finished: pb.RunFinished) -> list[str]:
    """The final summary: totals from the database, the cost, the time, where the files are."""
    s = finished.summary
    rate = augmentation_rate(
        s.generated_articles, s.augmented_articles, s.short_articles, s.long_articles
    )
    lines = [
        RULE,
        "Summary" + ("" if finished.ok else " (run stopped early)"),
        f"  Jobs:               {s.processed_jobs}/{s.total_jobs} processed",
        f"  Articles requested: {s.requested_articles}",
        f"  Generated:          {s.generated_articles}",
        f"  Augmented:          {s.augmented_articles}",
        f"  Failed:             {s.failed_articles}",
    ]
    if s.short_articles:
        lines.append(
            f"  Short:              {s.short_articles} (below the minimum after augmenting)"
        )
    if s.long_articles:
        lines.append(f"  Long:               {s.long_articles} (over the maximum after shortening)")
    if s.skipped_articles:
        lines.append(f"  Skipped (budget):   {s.skipped_articles}")
    if s.title_shortfall:
        lines.append(
            f"  Title shortfall:    {s.title_shortfall} (the model ran out of new titles; "
            "no article, no record)"
        )
    not_recorded = (
        s.requested_articles
        - s.generated_articles
        - s.augmented_articles
        - s.short_articles
        - s.long_articles
        - s.failed_articles
        - s.skipped_articles
        - s.title_shortfall
    )
    if not_recorded:
        lines.append(f"  Not started:        {not_recorded}")
    lines += [
        f"  Augmentation rate:  {rate:.1%}",
        f"  API calls:          {s.api_calls:,}",
        f"  Tokens:             {s.prompt_tokens + s.completion_tokens:,} "
        f"(prompt {s.prompt_tokens:,}, completion {s.completion_tokens:,})",
        f"  Cost:               {format_cost(s.cost_usd)}",
    ]
    if s.rate_limited or s.lowest_concurrency:
        lowest = f", concurrency lowered to {s.lowest_concurrency}" if s.lowest_concurrency else ""
        lines.append(f"  Rate limited:       {s.rate_limited} times (429){lowest}")
    lines += [
        f"  Links placed:       {s.links_placed:,}",
        f"  Pages written:      {s.pages_written:,}",
        f"  Execution time:     {s.execution_seconds:.1f}s",
        RULE,
    ]
    if s.pages_written:
        lines += [f"Open {d}/index.html to browse the sites" for d in s.output_dirs]
    if finished.error:
        lines.append(f"Error: {finished.error}")
    return lines


def event_lines(event: pb.JobEvent) -> list[str]:
    """The console lines for one event."""
    kind = event.WhichOneof("event")
    if kind == "job_started":
        j = event.job_started
        if j.resumed:
            return [
                f"Resuming job {j.job_id}, project '{j.project}': {j.requested_articles} articles "
                f"(concurrency: {j.max_workers}); only those without a record are generated"
            ]
        return [
            f"Job {j.job_number + 1}/{j.job_count} (ID: {j.job_id}), project '{j.project}': "
            f"{j.requested_articles} articles (concurrency: {j.max_workers})"
        ]
    if kind == "notice":
        n = event.notice
        return [f"[{n.tier or f'job {n.job_id}'}] {n.message}"]
    if kind == "tier_started":
        t = event.tier_started
        return [
            f"  {t.tier}: Generating {t.count} articles (concurrency: {t.max_workers})",
            f"[{t.tier}] Generating {t.count} titles in batches...",
        ]
    if kind == "titles_ready":
        titles = event.titles_ready
        lines = [f"[{titles.tier}] Generated {titles.count} titles"]
        if titles.rejected:
            lines.append(
                f"[{titles.tier}] Dropped {titles.rejected} reply lines that were not titles "
                "(preambles, markup, too short or too long) and asked again"
            )
        if titles.error:
            lines.append(
                f"[{titles.tier}] Title generation failed after retries ({titles.error}); "
                f"{titles.failed} articles recorded as failed at stage titles"
            )
        if titles.shortfall:
            lines.append(
                f"[{titles.tier}] Warning: after the top-up rounds the model still gave "
                f"{titles.shortfall} distinct titles too few; the tier will have {titles.count} "
                "articles"
            )
        return lines
    if kind == "article":
        return _article_lines(event.article)
    if kind == "tier_finished":
        done = event.tier_finished
        extra = "".join(
            f", {n} {what}"
            for n, what in ((done.short, "short"), (done.long, "long"), (done.skipped, "skipped"))
            if n
        )
        return [
            f"[{done.tier}] Done: {done.generated} generated, {done.augmented} augmented, "
            f"{done.failed} failed{extra} ({format_cost(done.cost_usd)})"
        ]
    if kind == "post_processing":
        return post_processing_lines(event.post_processing)
    if kind == "run_finished":
        return summary_lines(event.run_finished)
    return []
