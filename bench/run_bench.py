"""Benchmark: tierwriter through its real services against the in-process thread pool (baseline.py)
on the same simulator, in one run.

    python bench/run_bench.py                      # the full comparison (about 15 minutes)
    python bench/run_bench.py --workers 5 50 --repeats 1
    python bench/run_bench.py --compensation       # WORD_COUNT_COMPENSATION on and off
    python bench/run_bench.py --tiers 100 400 --workers 50   # tiers sharing the workers
    py-spy record -o profile.svg -- python bench/run_bench.py --profile 50

For each worker count W, at 0.25 s a call and at zero latency, both designs run the same job
(one tier, 800-1,200 words) on a fresh simulator with the same seed, `--repeats` times;
tierwriter on the in-process stack (`tierwriter up`'s) with SQLite. Reported: the median of each
figure and its spread (min-max), and tierwriter's as a ratio to the thread pool's:

- wall time: from submitting the job to its end (tierwriter: titles, articles, post-processing,
  stats; the thread pool: titles, articles);
- efficiency: the ideal bound over the wall time. The ideal bound is one titles call, then
  ceil(N / W) waves of the two calls an article needs (outline, content), at the latency;
- articles per second (zero latency);
- model calls per article (titles excluded), from the simulator's counts;
- first outline: seconds from the job's start (tierwriter: its job_started event, once the job
  is accepted and running; the thread pool: its start) to the first outline request.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from baseline import run_baseline

from generator_service.domain import ProjectInfo, TierShape
from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.console import augmentation_rate
from orchestrator_service.stack import LocalStack, StackConfig
from tierwriter.article.v1 import article_event_pb2 as article_pb

# The simulator's request kinds an article's calls fall into (titles are the job's).
ARTICLE_CALLS = ("outline", "outline_repair", "content", "augment", "continue")
TIER = TierShape("tier1", 0, 800, 1200, 3, 5, 3, 8)
PROJECT = ProjectInfo(
    0, "cnc machining", ["lathe", "spindle", "end mill"], ["cnc machining cost", "cnc near me"]
)


@dataclass
class Run:
    """One run of one design."""

    articles: int
    wall: float
    article_calls: int  # outline + content + augmentation calls
    first_outline: float  # job started → first outline request
    failed: int
    augmented: int = 0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # per service process
    # The same when post-processing began: the articles' part of the peak.
    articles_peak_rss_mb: dict[str, float] = field(default_factory=dict)
    # CPU seconds (user + system) per process: the services', and "bench" for this process
    # (the simulator and the client; for the thread pool, the simulator and the pool).
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def calls_per_article(self) -> float:
        return self.article_calls / self.articles


def job(
    articles: int, workers: int = 0, tiers: list[int] | None = None, stop_on_error: bool = False
) -> str:
    """The benchmark's job file: one tier of `articles`, or tiers of the `tiers` counts (tier 1
    first); with `workers`, its max_workers (else the stack's CONCURRENT_WORKERS). With
    `stop_on_error`, continue_on_error is false, which runs the tiers one after the other."""
    shape = {
        "min_word_count": TIER.min_word_count,
        "max_word_count": TIER.max_word_count,
        "min_h2_tags": TIER.min_h2,
        "max_h2_tags": TIER.max_h2,
        "min_h3_tags": TIER.min_h3,
        "max_h3_tags": TIER.max_h3,
    }
    project = {
        "name": f"bench-{uuid.uuid4().hex[:8]}",
        "main_keyword": PROJECT.keyword,
        "entities": PROJECT.entities,
        "related_searches": PROJECT.related_searches,
    }
    counts = tiers or [articles]
    spec: dict[str, object] = {
        "project": project,
        "tiers": {f"tier{n}": {"count": count, **shape} for n, count in enumerate(counts, 1)},
        "continue_on_error": not stop_on_error,
    }
    if workers:
        spec["max_workers"] = workers
    return json.dumps({"jobs": [spec]})


def _article_calls(simulator: LlmSimulator) -> int:
    kinds = simulator.stats().by_kind
    return sum(kinds.get(kind, 0) for kind in ARTICLE_CALLS)


def run_tierwriter(
    workers: int,
    articles: int,
    latency: float,
    seed: int,
    compensation: int | None = None,
    processes: bool = True,
    job_text: str = "",
    generators: int = 1,
    generator_settings: dict[str, object] | None = None,
) -> Run:
    """The job (`job_text`, else one tier of `articles`) through the real services, on a fresh
    stack and database: one process per service as `tierwriter up` runs them (`generators`
    generator processes), or (processes=False) threads of this process."""
    with tempfile.TemporaryDirectory(prefix="tierwriter-bench-") as tmp:
        password = uuid.uuid4().hex
        config = StackConfig.on_loopback(
            database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            output_dir=Path(tmp) / "output",
            simulator=SimulatorConfig(latency=latency, seed=seed),
            concurrent_workers=workers,
            word_count_compensation=compensation,
            admin_password=password,
            processes=processes,
            generators=generators,
            generator_settings={"log_level": "WARNING", **(generator_settings or {})},
        )
        with (
            LocalStack(config) as stack,
            OrchestratorClient(stack.orchestrator_address, "admin", password) as client,
        ):
            pids = stack.service_pids()
            cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
            cpu_before["bench"] = time.process_time()
            first_outline = 0.0
            articles_peaks: dict[str, float] = {}
            started = job_started = time.perf_counter()
            for event in client.run_job(job_text or job(articles)):
                if event.WhichOneof("event") == "job_started":
                    job_started = time.perf_counter()
                elif event.WhichOneof("event") == "article":
                    kind = event.article.kind
                    if kind == article_pb.ARTICLE_EVENT_KIND_OUTLINE_STARTED and not first_outline:
                        first_outline = time.perf_counter() - job_started
                elif event.WhichOneof("event") == "post_processing" and not articles_peaks:
                    articles_peaks = {name: _peak_rss_mb(pid) for name, pid in pids.items()}
                elif event.WhichOneof("event") == "run_finished":
                    finished = event.run_finished
            wall = time.perf_counter() - started
            cpu = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            cpu["bench"] = time.process_time() - cpu_before["bench"]
            assert stack.simulator is not None
            calls = _article_calls(stack.simulator)
            peaks = {name: _peak_rss_mb(pid) for name, pid in pids.items()}
    if not finished.ok:
        raise SystemExit(f"benchmark run failed: {finished.error}")
    s = finished.summary
    return Run(
        articles,
        wall,
        calls,
        first_outline,
        s.failed_articles,
        s.augmented_articles,
        peaks,
        articles_peaks,
        cpu,
    )


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, user + system (Linux: /proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (Linux: VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory_table(workers: int, sizes: list[int], seed: int) -> None:
    """Peak memory of the three service processes for jobs of growing size (zero latency)."""
    print(f"\nPeak RSS of the service processes, one job, {workers} workers, zero latency:\n")
    print(
        "| articles | persistence | generator | orchestrator (until post-processing) "
        "| together | wall |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        r = run_tierwriter(workers, n, 0.0, seed)
        peak = r.peak_rss_mb
        before = r.articles_peak_rss_mb.get("orchestrator_service", 0.0)
        print(
            f"| {n} | {peak['persistence_service']:.0f} MB | {peak['generator_service']:.0f} MB "
            f"| {peak['orchestrator_service']:.0f} MB ({before:.0f} MB) "
            f"| {sum(peak.values()):.0f} MB | {r.wall:.1f} s |",
            flush=True,
        )


def run_thread_pool(workers: int, articles: int, latency: float, seed: int) -> Run:
    """The same job on the in-process thread pool, on a fresh simulator."""
    with (
        tempfile.TemporaryDirectory(prefix="tierwriter-baseline-") as tmp,
        LlmSimulator(SimulatorConfig(latency=latency, seed=seed)) as simulator,
    ):
        cpu_before = time.process_time()
        run = run_baseline(
            simulator.base_url, workers, articles, TIER, PROJECT, Path(tmp) / "baseline.db"
        )
        cpu = {"bench": time.process_time() - cpu_before}
        calls = _article_calls(simulator)
    return Run(run.articles, run.wall, calls, run.first_outline_after, run.failed, cpu_seconds=cpu)


def run_thread_pool_tiers(workers: int, counts: list[int], latency: float, seed: int) -> float:
    """Wall seconds of the seed's design for a job of several tiers: each tier's titles, then its
    articles on the thread pool, tier after tier, on one simulator."""
    with (
        tempfile.TemporaryDirectory(prefix="tierwriter-baseline-") as tmp,
        LlmSimulator(SimulatorConfig(latency=latency, seed=seed)) as simulator,
    ):
        return sum(
            run_baseline(
                simulator.base_url, workers, count, TIER, PROJECT, Path(tmp) / f"tier{n}.db"
            ).wall
            for n, count in enumerate(counts, 1)
        )


def tiers_table(workers: int, counts: list[int], latency: float, repeats: int, seed: int) -> None:
    """A job of several tiers: tierwriter with its tiers sharing the workers, tierwriter with
    them one after the other (continue_on_error false), and the thread pool tier after tier."""
    total = sum(counts)
    ideal = (1 + 2 * math.ceil(total / workers)) * latency
    print(
        f"\nTiers of {'/'.join(map(str, counts))} articles, {workers} workers, {latency} s a call, "
        f"{repeats} repeat(s); ideal bound {ideal:.2f} s:\n"
    )
    print("| design | wall | efficiency |")
    print("|---|---:|---:|")
    designs: dict[str, Callable[[], float]] = {
        "tierwriter, tiers share the workers": lambda: (
            run_tierwriter(workers, total, latency, seed, job_text=job(0, workers, counts)).wall
        ),
        "tierwriter, tier after tier (continue_on_error false)": lambda: (
            run_tierwriter(
                workers, total, latency, seed, job_text=job(0, workers, counts, stop_on_error=True)
            ).wall
        ),
        "thread pool, tier after tier": lambda: run_thread_pool_tiers(
            workers, counts, latency, seed
        ),
    }
    for name, run in designs.items():
        walls = [run() for _ in range(repeats)]
        print(
            f"| {name} | {spread(walls, lambda v: f'{v:.2f} s')} "
            f"| {spread([ideal / w for w in walls], lambda v: f'{v:.2f}')} |",
            flush=True,
        )


def _cpu_ms(runs: list[Run], process: str | None = None) -> float:
    """Median CPU milliseconds per article: of one process, or of all of them."""
    return statistics.median(
        1000
        * (r.cpu_seconds.get(process, 0.0) if process else sum(r.cpu_seconds.values()))
        / r.articles
        for r in runs
    )


def _cpu_by_process(runs: list[Run]) -> str:
    """Median CPU milliseconds per article in all, and by process."""
    parts = ", ".join(
        f"{name.removesuffix('_service')} {_cpu_ms(runs, name):.1f}"
        for name in sorted(runs[0].cpu_seconds)
    )
    return f"{_cpu_ms(runs):.1f} ({parts})"


def ideal_bound(articles: int, workers: int, latency: float) -> float:
    """One titles call, then ceil(N / W) waves of outline + content."""
    return (1 + 2 * math.ceil(articles / workers)) * latency


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    middle = fmt(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt(min(values))} to {fmt(max(values))})"


def compare(
    workers: list[int],
    latency: float,
    articles: int,
    repeats: int,
    seed: int,
    processes: bool,
) -> None:
    """One table: both designs at each worker count."""
    how = "one process per service" if processes else "in one process"
    print(
        f"\n{articles} articles (800-1,200 words), {latency} s a call, {repeats} repeat(s), "
        f"tierwriter {how}:\n"
    )
    if latency:
        print(
            "| W | tierwriter wall | thread pool wall | wall ratio | efficiency tierwriter "
            "| efficiency thread pool | calls/article | first outline |"
        )
    else:
        print(
            "| W | tierwriter articles/s | thread pool articles/s | ratio "
            "| calls/article | first outline | CPU ms/article |"
        )
    print("|---:" * (8 if latency else 7) + "|")
    for w in workers:
        ours = [
            run_tierwriter(w, articles, latency, seed, processes=processes) for _ in range(repeats)
        ]
        peer = [run_thread_pool(w, articles, latency, seed) for _ in range(repeats)]
        ratio = statistics.median(r.wall for r in ours) / statistics.median(r.wall for r in peer)
        calls = (
            f"{statistics.median(r.calls_per_article for r in ours):.2f} vs "
            f"{statistics.median(r.calls_per_article for r in peer):.2f}"
        )
        first = (
            f"{statistics.median(r.first_outline for r in ours):.2f} s vs "
            f"{statistics.median(r.first_outline for r in peer):.2f} s"
        )
        failed = (sum(r.failed for r in ours), sum(r.failed for r in peer))
        note = f" (failed: {failed[0]} tierwriter, {failed[1]} thread pool)" if any(failed) else ""
        if latency:
            ideal = ideal_bound(articles, w, latency)
            print(
                f"| {w} | {spread([r.wall for r in ours], lambda v: f'{v:.2f} s')} "
                f"| {spread([r.wall for r in peer], lambda v: f'{v:.2f} s')} "
                f"| {ratio:.2f}x "
                f"| {spread([ideal / r.wall for r in ours], lambda v: f'{v:.2f}')} "
                f"| {spread([ideal / r.wall for r in peer], lambda v: f'{v:.2f}')} "
                f"| {calls} | {first}{note} |",
                flush=True,
            )
        else:
            print(
                f"| {w} | {spread([articles / r.wall for r in ours], lambda v: f'{v:.0f}')} "
                f"| {spread([articles / r.wall for r in peer], lambda v: f'{v:.0f}')} "
                f"| {1 / ratio:.2f}x | {calls} | {first} "
                f"| {_cpu_by_process(ours)} vs {_cpu_ms(peer):.1f}{note} |",
                flush=True,
            )


def compensation_table(workers: int, articles: int, latency: float, seed: int) -> None:
    print(f"\nWord-count compensation at workers={workers}:\n")
    print("| WORD_COUNT_COMPENSATION | augmentation rate | calls/article | wall time |")
    print("|---:|---:|---:|---:|")
    for compensation in (200, 0):
        r = run_tierwriter(workers, articles, latency, seed, compensation)
        rate = augmentation_rate(r.articles - r.augmented - r.failed, r.augmented)
        print(
            f"| {compensation} | {rate:.1%} | {r.calls_per_article:.2f} | {r.wall:.2f} s |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 5, 10, 50, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--articles",
        type=int,
        default=0,
        help="articles per job (default: 100 below 50 workers, 500 from 50, at 0.25 s; "
        "500 at zero latency)",
    )
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.25, 0.0])
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run tierwriter's services as threads of one process (as the tests and the demo "
        "do) instead of one process per service (as `tierwriter up` does)",
    )
    parser.add_argument(
        "--compensation",
        action="store_true",
        help="only the word-count compensation table (100 articles, 10 workers, 0.25 s)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        nargs="+",
        metavar="N",
        help="only the services' peak memory for jobs of N articles (e.g. 500 2000 10000)",
    )
    parser.add_argument(
        "--tiers",
        type=int,
        nargs="+",
        metavar="N",
        help="only a job of tiers of these counts (e.g. 100 400) at the first --workers and "
        "0.25 s: tiers sharing the workers, tier after tier, and the thread pool tier after tier",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="W",
        help="only tierwriter, once, at W workers, 500 articles, zero latency (run it under "
        "py-spy or pyinstrument)",
    )
    args = parser.parse_args()
    if args.compensation:
        compensation_table(10, args.articles or 100, 0.25, args.seed)
        return
    if args.memory:
        memory_table(50, args.memory, args.seed)
        return
    if args.tiers:
        tiers_table(args.workers[0], args.tiers, args.latencies[0], args.repeats, args.seed)
        return
    if args.profile:
        r = run_tierwriter(
            args.profile, args.articles or 500, 0.0, args.seed, processes=not args.in_process
        )
        print(f"{r.articles} articles in {r.wall:.2f} s: {r.articles / r.wall:.0f}/s")
        print(f"CPU ms/article: {_cpu_by_process([r])}")
        return
    for latency in args.latencies:
        if args.articles:
            groups = {args.articles: args.workers}
        elif latency:
            groups = {
                100: [w for w in args.workers if w < 50],
                500: [w for w in args.workers if w >= 50],
            }
        else:
            groups = {500: args.workers}
        for articles, workers in groups.items():
            if workers:
                compare(workers, latency, articles, args.repeats, args.seed, not args.in_process)


if __name__ == "__main__":
    main()
