"""Benchmark: tierwriter against provider-like simulators, through the real services.

    python bench/provider_bench.py                      # every part, the defaults below
    python bench/provider_bench.py --rpm 300 --rpm-articles 300
    python bench/provider_bench.py --profiles-only

1. Rate limits: the simulator enforces R requests a minute the way providers do (a bucket of
   one minute's requests, refilled continuously) and LLM_RPM_LIMIT is set to R; then the same
   for T tokens a minute (prompt bytes / 4 + max_tokens, as llmock counts) and LLM_TPM_LIMIT.
   Reported: what was sent as a share of what the limit allows in the run's time (the full
   bucket plus its refill), the rate past the first minute's bucket, the share answered 429,
   and the articles that failed.
2. Word targets: three simulated models that miss the asked lower bound by 175, by 350 and by
   -100 words (an overshoot), +/- 60 each, on a tier of 800-1,200 words. Reported, for the
   articles after the model's first 20: the share that needed augmentation, the share over the
   maximum, and model calls per article (titles excluded).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.stack import LocalStack, StackConfig
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

WARM_UP = 20  # articles a model needs before its learned targets are judged
MIN_WORDS, MAX_WORDS = 800, 1200


def job(articles: int) -> str:
    tier = {
        "count": articles,
        "min_word_count": MIN_WORDS,
        "max_word_count": MAX_WORDS,
        "min_h2_tags": 3,
        "max_h2_tags": 5,
        "min_h3_tags": 3,
        "max_h3_tags": 8,
    }
    project = {
        "name": f"bench-{uuid.uuid4().hex[:8]}",
        "main_keyword": "cnc machining",
        "entities": ["lathe", "spindle", "end mill"],
        "related_searches": ["cnc machining cost", "cnc near me", "cnc tolerances"],
    }
    return json.dumps({"jobs": [{"project": project, "tiers": {"tier1": tier}}]})


@dataclass
class Run:
    """What one job on a fresh stack did."""

    wall: float
    finished: pb.RunFinished
    simulator: Any  # SimulatorStats
    records: list[dict[str, Any]]  # in the order they were stored


def run(articles: int, workers: int, simulator: SimulatorConfig, generator: dict[str, Any]) -> Run:
    """The job once, on a fresh stack and SQLite database."""
    with tempfile.TemporaryDirectory(prefix="tierwriter-bench-") as tmp:
        password = uuid.uuid4().hex
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        config = StackConfig.on_loopback(
            database_url=url,
            output_dir=Path(tmp) / "output",
            simulator=simulator,
            concurrent_workers=workers,
            admin_password=password,
            generator_settings=generator,
        )
        with (
            LocalStack(config) as stack,
            OrchestratorClient(stack.orchestrator_address, "admin", password) as client,
        ):
            started = time.perf_counter()
            events = list(client.run_job(job(articles)))
            wall = time.perf_counter() - started
            assert stack.simulator is not None
            stats = stack.simulator.stats()
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                records = [
                    dict(row)
                    for row in connection.execute(
                        text(
                            "SELECT status, word_count, draft_words, api_calls, rate_limited "
                            "FROM generated_content ORDER BY id"
                        )
                    ).mappings()
                ]
        finally:
            engine.dispose()
    return Run(wall, events[-1].run_finished, stats, records)


def rate_limits(limit: int, unit: str, articles: int, workers: int) -> None:
    """One run against a simulator enforcing `limit` requests (unit "requests") or tokens
    ("tokens") a minute, with the same limit set for tierwriter."""
    if unit == "requests":
        simulator, setting = SimulatorConfig(latency=0.02, rpm_limit=limit), "llm_rpm_limit"
    else:
        simulator, setting = SimulatorConfig(latency=0.02, tpm_limit=limit), "llm_tpm_limit"
    r = run(articles, workers, simulator, {setting: limit})
    requests = r.simulator.requests + r.simulator.rate_limited
    sent = requests if unit == "requests" else r.simulator.tokens_charged
    allowed = limit + limit * r.wall / 60  # the full bucket plus what refilled during the run
    sustained = (sent - limit) / max(r.wall, 1e-9) * 60  # past the first minute's bucket
    failed = sum(row["status"] == "failed" for row in r.records)
    print(f"| {limit:,} {unit}/min | {articles} at {workers} workers | {r.wall:.1f} s ", end="")
    print(
        f"| {sent:,} {unit} | {sent / allowed:.1%} | {sustained:,.0f}/min "
        f"({sustained / limit:.1%} of the limit) | {r.simulator.rate_limited} of {requests} "
        f"({r.simulator.rate_limited / requests:.1%}) | {failed} |",
        flush=True,
    )


def profiles(articles: int, workers: int, latency: float) -> None:
    print(
        f"Word targets: {articles} articles per model at {workers} workers, tier "
        f"{MIN_WORDS}-{MAX_WORDS} words; rates over the articles after each model's first "
        f"{WARM_UP}\n"
    )
    print(
        "| model misses the asked minimum by | augmentation | over the maximum | short "
        "| calls/article | augmentation in the first 20 |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for shortfall in (175, 350, -100):
        simulator = SimulatorConfig(
            latency=latency, undershoot_mean=shortfall, undershoot_jitter=60
        )
        r = run(articles, workers, simulator, {})
        late = r.records[WARM_UP:]
        augmented = sum(row["status"] in ("augmented", "short") for row in late)
        over = sum(row["word_count"] > MAX_WORDS for row in late)
        short = sum(row["status"] == "short" for row in late)
        early = sum(row["status"] in ("augmented", "short") for row in r.records[:WARM_UP])
        calls = sum(row["api_calls"] for row in r.records) / len(r.records)
        print(
            f"| {shortfall:+d} +/- 60 words | {augmented / len(late):.1%} "
            f"| {over / len(late):.1%} | {short} | {calls:.2f} | {early}/{WARM_UP} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rpm", type=int, default=300, help="the simulated provider's limit")
    parser.add_argument("--rpm-articles", type=int, default=300)
    parser.add_argument("--tpm", type=int, default=120_000, help="the simulated provider's limit")
    parser.add_argument("--tpm-articles", type=int, default=60)
    parser.add_argument("--rpm-workers", type=int, default=20)
    parser.add_argument("--articles", type=int, default=120, help="per word-target profile")
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--profiles-only", action="store_true")
    args = parser.parse_args()
    if not args.profiles_only:
        print(
            "| limit | articles | wall time | sent | sent / allowed by the limit "
            "| rate past the first minute | answered 429 | articles failed |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        rate_limits(args.rpm, "requests", args.rpm_articles, args.rpm_workers)
        rate_limits(args.tpm, "tokens", args.tpm_articles, args.rpm_workers)
        print()
    profiles(args.articles, args.workers, args.latency)


if __name__ == "__main__":
    main()
