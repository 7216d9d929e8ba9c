"""Benchmark: one job through the real services (gRPC on loopback, the simulator over HTTP through
the openai SDK, SQLite) at a fixed simulated latency, at several worker counts, in one run.

    python bench/run_bench.py                 # 100 articles, 0.25 s a call, workers 1 5 10
    python bench/run_bench.py --articles 100 --latency 0.5 --workers 1 2 5 10 20

Reports wall time, speedup against workers=1, efficiency against the ideal bound
ceil(N / W) x calls per article x latency, model calls per article and the augmentation rate;
then the augmentation rate with and without WORD_COUNT_COMPENSATION."""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.console import augmentation_rate
from orchestrator_service.stack import LocalStack, StackConfig
from tierwriter.article.v1 import article_event_pb2 as article_pb

TERMINAL = {
    article_pb.ARTICLE_EVENT_KIND_SAVED,
    article_pb.ARTICLE_EVENT_KIND_FAILED,
    article_pb.ARTICLE_EVENT_KIND_SKIPPED,
}


@dataclass
class Measurement:
    """One run at one worker count."""

    workers: int
    articles: int
    wall: float  # the whole RunJob: titles, articles, post-processing, stats
    article_phase: float  # first article started → last article terminal
    article_calls: int  # outline + content + augmentation calls
    augmented: int
    generated: int
    failed: int

    @property
    def calls_per_article(self) -> float:
        return self.article_calls / self.articles

    def ideal(self, latency: float) -> float:
        """The article phase if every wave of W articles took exactly its calls x latency."""
        return math.ceil(self.articles / self.workers) * self.calls_per_article * latency


def job(articles: int) -> str:
    return json.dumps(
        {
            "jobs": [
                {
                    "project": {
                        "name": f"bench-{uuid.uuid4().hex[:8]}",
                        "main_keyword": "cnc machining",
                        "entities": ["lathe", "spindle", "end mill"],
                        "related_searches": ["cnc machining cost"],
                    },
                    "tiers": {
                        "tier1": {
                            "count": articles,
                            "min_word_count": 1000,
                            "max_word_count": 1500,
                            "min_h2_tags": 3,
                            "max_h2_tags": 5,
                            "min_h3_tags": 5,
                            "max_h3_tags": 10,
                        }
                    },
                }
            ]
        }
    )


def measure(
    workers: int, articles: int, latency: float, compensation: int | None, seed: int
) -> Measurement:
    """Run the job once on a fresh stack and database."""
    with tempfile.TemporaryDirectory(prefix="tierwriter-bench-") as tmp:
        password = uuid.uuid4().hex
        config = StackConfig.on_loopback(
            database_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
            output_dir=Path(tmp) / "output",
            simulator=SimulatorConfig(latency=latency, seed=seed),
            concurrent_workers=workers,
            word_count_compensation=compensation,
            admin_password=password,
        )
        with (
            LocalStack(config) as stack,
            OrchestratorClient(stack.orchestrator_address, "admin", password) as client,
        ):
            first_start = last_end = 0.0
            started = time.perf_counter()
            for event in client.run_job(job(articles)):
                if event.WhichOneof("event") == "article":
                    now = time.perf_counter()
                    if (
                        event.article.kind == article_pb.ARTICLE_EVENT_KIND_STARTED
                        and not first_start
                    ):
                        first_start = now
                    if event.article.kind in TERMINAL:
                        last_end = now
                elif event.WhichOneof("event") == "run_finished":
                    finished = event.run_finished
            wall = time.perf_counter() - started
            assert stack.simulator is not None
            kinds = stack.simulator.stats().by_kind
    if not finished.ok:
        raise SystemExit(f"benchmark run failed: {finished.error}")
    s = finished.summary
    return Measurement(
        workers,
        articles,
        wall,
        last_end - first_start,
        kinds.get("outline", 0) + kinds.get("content", 0) + kinds.get("augment", 0),
        s.augmented_articles,
        s.generated_articles,
        s.failed_articles,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", type=int, default=100)
    parser.add_argument(
        "--latency", type=float, default=0.25, help="simulated seconds per model call"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.workers[0] != 1:
        args.workers.insert(0, 1)  # speedup is against workers=1

    print(
        f"{args.articles} articles, one tier (1000-1500 words), "
        f"simulated latency {args.latency}s a call\n"
    )
    print(
        "| workers | wall time | speedup vs 1 | article phase | ideal bound | efficiency "
        "| calls/article | augmentation rate |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for workers in args.workers:
        m = measure(workers, args.articles, args.latency, None, args.seed)
        baseline = baseline or m.wall
        ideal = m.ideal(args.latency)
        print(
            f"| {workers} | {m.wall:.2f} s | {baseline / m.wall:.2f}x | {m.article_phase:.2f} s "
            f"| {ideal:.2f} s | {ideal / m.article_phase:.0%} | {m.calls_per_article:.2f} "
            f"| {augmentation_rate(m.generated, m.augmented):.1%} |",
            flush=True,
        )

    top = max(args.workers)
    print(
        f"\nWord-count compensation at workers={top} (the simulator undershoots the asked lower "
        "bound by ~175 +/- 20 words):\n"
    )
    print("| WORD_COUNT_COMPENSATION | augmentation rate | calls/article | wall time |")
    print("|---:|---:|---:|---:|")
    for compensation in (200, 0):
        m = measure(top, args.articles, args.latency, compensation, args.seed)
        print(
            f"| {compensation} | {augmentation_rate(m.generated, m.augmented):.1%} "
            f"| {m.calls_per_article:.2f} | {m.wall:.2f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
