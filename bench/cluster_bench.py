"""Benchmark: tierwriter with more than one generator process, in one run.

    python bench/cluster_bench.py                     # all three parts (about 10 minutes)
    python bench/cluster_bench.py --part scaling --repeats 1
    python bench/cluster_bench.py --part limit --rpm 600 --limit-articles 500

1. Scaling: one job (one tier, 800-1,200 words) through 1, 2 and 3 generator processes (one
   process per service, SQLite, as `tierwriter up` runs them), at 0.25 s a call and at zero
   latency, and the in-process thread pool (baseline.py) on the same simulator. Reported: the
   median wall time or articles/s and its spread, the ratio to one generator and to the thread
   pool, efficiency against the ideal bound, model calls per article, CPU ms per article. The
   job's max_workers caps the articles in flight over all generators, so at 0.25 s more
   generators help only where one generator's CPU (its GIL) is what binds; on 2 cores every
   process shares the same two.
2. One account limit: 3 generators, 2 jobs at once, LLM_RPM_LIMIT = R, and a simulator that
   enforces R the way a provider does (a bucket of one minute's requests, full at start,
   refilled continuously; 429 past it). The simulator's request count is sampled every 50 ms;
   reported: requests in the first 60 s (the bucket's initial fill plus its refill, as the
   provider's own bucket allows), the most and the least in any later 60 s window while both
   jobs ran, as shares of R, the 429s and the failed articles.
3. The shared bucket's cost: the scaling job at zero latency on one generator with an
   LLM_RPM_LIMIT so high it never binds, against no limit: each model call then reserves from
   the database's bucket first (a ReserveRate call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from run_bench import (
    Run,
    _cpu_by_process,
    ideal_bound,
    job,
    run_thread_pool,
    run_tierwriter,
    spread,
)

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.stack import LocalStack, StackConfig

WINDOW = 60.0  # seconds: the provider's per-minute limit
SAMPLE_EVERY = 0.05


def scaling_table(
    articles: int, workers: int, latency: float, generators: list[int], repeats: int, seed: int
) -> None:
    """One job through 1..N generator processes, and the thread pool."""
    print(
        f"\nOne job of {articles} articles, max_workers {workers}, {latency} s a call, "
        f"{repeats} repeat(s), one process per service:\n"
    )
    what = "wall" if latency else "articles/s"
    print(
        f"| generators | {what} | vs 1 generator | vs thread pool | efficiency | calls/article "
        "| CPU ms/article (by process) |"
    )
    print("|---:" * 7 + "|")
    peer = [run_thread_pool(workers, articles, latency, seed) for _ in range(repeats)]
    peer_wall = statistics.median(r.wall for r in peer)
    one = 0.0
    for n in generators:
        ours = [
            run_tierwriter(workers, articles, latency, seed, generators=n) for _ in range(repeats)
        ]
        _fail_on_failures(ours)
        wall = statistics.median(r.wall for r in ours)
        one = one or wall
        figure = (
            spread([r.wall for r in ours], lambda v: f"{v:.2f} s")
            if latency
            else spread([articles / r.wall for r in ours], lambda v: f"{v:.0f}")
        )
        ideal = ideal_bound(articles, workers, latency)
        efficiency = spread([ideal / r.wall for r in ours], "{:.2f}".format) if latency else "-"
        calls = statistics.median(r.calls_per_article for r in ours)
        print(
            f"| {n} | {figure} | {one / wall:.2f}x | {peer_wall / wall:.2f}x | {efficiency} "
            f"| {calls:.2f} | {_cpu_by_process(ours)} |",
            flush=True,
        )
    print(
        f"\nThread pool: {spread([r.wall for r in peer], lambda v: f'{v:.2f} s')} "
        f"({articles / peer_wall:.0f} articles/s)"
    )


def _fail_on_failures(runs: list[Run]) -> None:
    failed = sum(r.failed for r in runs)
    if failed:
        raise SystemExit(f"benchmark run failed: {failed} articles failed")


def limit_run(rpm: int, articles_per_job: int, workers: int, seed: int) -> None:
    """Two jobs on three generators under one LLM_RPM_LIMIT, at a simulator enforcing it."""
    with tempfile.TemporaryDirectory(prefix="tierwriter-bench-") as tmp:
        password = uuid.uuid4().hex
        config = StackConfig.on_loopback(
            database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            output_dir=Path(tmp) / "output",
            simulator=SimulatorConfig(latency=0.0, seed=seed, rpm_limit=rpm),
            concurrent_workers=workers,
            admin_password=password,
            processes=True,
            generators=3,
            generator_settings={"log_level": "WARNING", "llm_rpm_limit": rpm},
        )
        with (
            LocalStack(config) as stack,
            OrchestratorClient(stack.orchestrator_address, "admin", password) as client,
        ):
            simulator = stack.simulator
            assert simulator is not None
            samples: list[tuple[float, int]] = []  # (monotonic time, requests so far)
            done = threading.Event()

            def sample() -> None:
                while not done.wait(SAMPLE_EVERY):
                    samples.append((time.monotonic(), simulator.stats().requests))

            jobs = [json.loads(job(articles_per_job, workers))["jobs"][0] for _ in range(2)]
            sampler = threading.Thread(target=sample, name="bench-sampler")
            sampler.start()
            try:
                started = time.monotonic()
                job_ids = client.submit_job(json.dumps({"jobs": jobs}))
                ended: dict[int, float] = {}
                with client.watch_jobs(job_ids) as events:
                    for event in events:
                        if event.WhichOneof("event") == "run_finished":
                            ended[event.job_id] = time.monotonic()
                            if len(ended) == len(job_ids):
                                break
            finally:
                done.set()
                sampler.join()
            stats = simulator.stats()
            failed = [client.get_job(j).job.failed_articles for j in job_ids]
    both_ran_until = min(ended.values())
    first = _requests_between(samples, started, started + WINDOW)
    later = [
        _requests_between(samples, t, t + WINDOW)
        for t, _ in samples
        if t >= started + WINDOW and t + WINDOW <= both_ran_until
    ]
    print(
        f"\nTwo jobs of {articles_per_job} articles, max_workers {workers} each, 3 generators, "
        f"LLM_RPM_LIMIT {rpm}, the simulator enforcing {rpm} a minute, zero latency:\n"
    )
    print(
        f"- run: {max(ended.values()) - started:.0f} s, {stats.requests} requests, "
        f"{stats.rate_limited} answered 429, failed articles {sum(failed)}"
    )
    print(
        f"- first 60 s: {first} requests ({first / rpm:.2f} R: the bucket's fill of "
        f"{0.98 * rpm:.0f} plus its refill)"
    )
    if later:
        print(
            f"- later 60 s windows ({len(later)} sampled, while both jobs ran): most "
            f"{max(later)} ({max(later) / rpm:.3f} R), least {min(later)} "
            f"({min(later) / rpm:.3f} R)"
        )
    else:
        print("- no 60 s window after the first while both jobs ran: give them more articles")


def _requests_between(samples: list[tuple[float, int]], start: float, end: float) -> int:
    """Requests between the first sample at or after `start` and the first at or after `end`:
    a window a sample interval longer at most, so the most is never understated."""
    at_start = next((n for t, n in samples if t >= start), samples[-1][1])
    at_end = next((n for t, n in samples if t >= end), samples[-1][1])
    return at_end - at_start


def reservation_cost(articles: int, workers: int, repeats: int, seed: int) -> None:
    """Articles/s at zero latency, one generator, with and without a never-binding limit."""
    free = [run_tierwriter(workers, articles, 0.0, seed) for _ in range(repeats)]
    limited = [
        run_tierwriter(workers, articles, 0.0, seed, generator_settings={"llm_rpm_limit": 10**9})
        for _ in range(repeats)
    ]
    _fail_on_failures(free + limited)
    rate = {
        name: statistics.median(articles / r.wall for r in runs)
        for name, runs in (("free", free), ("limited", limited))
    }
    print(
        f"\nThe shared bucket's cost: {articles} articles, max_workers {workers}, zero latency, "
        f"one generator, {repeats} repeat(s):\n"
    )
    print("| LLM_RPM_LIMIT | articles/s | CPU ms/article (by process) |")
    print("|---|---:|---:|")
    print(f"| unset | {rate['free']:.0f} | {_cpu_by_process(free)} |")
    print(f"| 10^9 (never binds) | {rate['limited']:.0f} | {_cpu_by_process(limited)} |")
    print(f"\nWith the limit: {rate['limited'] / rate['free']:.2f}x the articles/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["scaling", "limit", "cost"], action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--generators", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--articles", type=int, default=600, help="scaling and cost job size")
    parser.add_argument("--workers", type=int, default=100, help="the scaling job's max_workers")
    parser.add_argument("--rpm", type=int, default=600, help="the shared limit R")
    parser.add_argument("--limit-articles", type=int, default=500, help="each limit job's size")
    args = parser.parse_args()
    parts = args.part or ["scaling", "limit", "cost"]
    if "scaling" in parts:
        for latency in (0.25, 0.0):
            scaling_table(
                args.articles, args.workers, latency, args.generators, args.repeats, args.seed
            )
    if "limit" in parts:
        limit_run(args.rpm, args.limit_articles, 10, args.seed)
    if "cost" in parts:
        reservation_cost(args.articles, 50, args.repeats, args.seed)


if __name__ == "__main__":
    main()
