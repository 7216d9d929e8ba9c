"""Benchmark: the docker-compose deployment (PostgreSQL, the three services and the simulator, each
a container) against the in-process thread pool (baseline.py) on the same simulator, in one run.

    ../shared/docker/engine.sh up            # a Docker engine with docker-compose
    python bench/compose_bench.py            # W = 10 and 50, 0.25 s and zero latency
    python bench/compose_bench.py --workers 5 50 --latencies 0.25 --repeats 3

The stack is this tree built and started as the README's "Deploying with docker-compose" has a
user do it (the shared simulator container, one generator), from a temporary copy with its own
.env, and taken down with its volumes and images afterwards. The simulator's latency is fixed
when the stack starts, so the stack is started once per latency. The thread pool runs in this
process against a simulator of the same latency, as in run_bench.py.

Reported per worker count: wall time (or articles per second at zero latency) of both, their
ratio, efficiency against the ideal bound, model calls per article (titles included: the
simulator container's counts are not reachable from outside), the CPU the containers used per
article (cgroup v1 or v2 accounting read inside each container) and their peak memory.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from baseline import run_baseline
from run_bench import PROJECT, TIER, ideal_bound, job, spread

from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from orchestrator_service.client import OrchestratorClient

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ["docker-compose"]
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "data", "output", "tls", ".env", "*.egg-info", "__pycache__", ".*_cache", ".venv"
)
SERVICES = ("postgres", "persistence", "generator", "orchestrator", "simulator")
# Inside a container: CPU time used so far (cgroup v2 in microseconds, v1 in nanoseconds) and
# peak memory (v2 memory.peak, v1 max_usage_in_bytes).
_CGROUP_CPU = (
    "awk '/usage_usec/ {print $2 * 1000}' /sys/fs/cgroup/cpu.stat 2>/dev/null "
    "|| cat /sys/fs/cgroup/cpuacct/cpuacct.usage"
)
_CGROUP_PEAK = (
    "cat /sys/fs/cgroup/memory.peak 2>/dev/null "
    "|| cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes"
)


@dataclass
class ComposeRun:
    articles: int
    wall: float
    api_calls: int  # titles included
    failed: int
    cpu_seconds: dict[str, float]  # by compose service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """This tree as one compose project in a temporary folder."""

    def __init__(self, folder: Path, latency: float) -> None:
        self.folder = folder
        self.project = f"twbench{uuid.uuid4().hex[:8]}"
        self.port = _free_port()
        self.password = "admin-" + uuid.uuid4().hex[:12]
        (folder / ".env").write_text(
            f"POSTGRES_PASSWORD={uuid.uuid4().hex}\n"
            f"SERVICE_TOKEN={uuid.uuid4().hex}{uuid.uuid4().hex}\n"
            f"TIERWRITER_ADMIN_PASSWORD={self.password}\n"
            f"ORCHESTRATOR_PORT={self.port}\n"
            "COMPOSE_FILE=docker-compose.yml:docker-compose.simulator.yml\n"
            f"SIMULATOR_LATENCY={latency}\n"
            "LOG_LEVEL=WARNING\n"
        )

    def compose(self, *args: str, timeout: float = 900) -> str:
        result = subprocess.run(
            [*COMPOSE, "-p", self.project, *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode:
            raise SystemExit(f"docker-compose {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def containers(self) -> dict[str, str]:
        """Container id by compose service."""
        ids = self.compose("ps", "-q").split()
        names = subprocess.run(
            [
                "docker",
                "inspect",
                "--format",
                '{{.Id}} {{index .Config.Labels "com.docker.compose.service"}}',
                *ids,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        return {service: cid for cid, service in (n.split() for n in names if n.strip())}

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = self.compose("ps", "-q").split()
            states = subprocess.run(
                ["docker", "inspect", "--format", "{{.State.Health.Status}}", *ids],
                capture_output=True,
                text=True,
            ).stdout.split()
            if len(states) == len(SERVICES) and all(s == "healthy" for s in states):
                return
            time.sleep(2)  # polling the engine: compose v1 has no `up --wait`
        raise SystemExit(f"the stack did not become healthy in {timeout:.0f} s")

    def read(self, container: str, command: str) -> float:
        out = subprocess.run(
            ["docker", "exec", container, "sh", "-c", command],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return float(out.split()[0])


@contextmanager
def deployed(latency: float) -> Iterator[Deployment]:
    """The stack up and healthy at this simulator latency; down with its volumes afterwards."""
    with tempfile.TemporaryDirectory(prefix="tierwriter-compose-bench-") as tmp:
        folder = Path(tmp) / "tierwriter"
        shutil.copytree(ROOT, folder, ignore=COPY_IGNORE)
        stack = Deployment(folder, latency)
        try:
            stack.compose("up", "-d", "--build")
            stack.wait_healthy()
            yield stack
        finally:
            subprocess.run(
                [*COMPOSE, "-p", stack.project, "down", "-v", "--rmi", "local", "-t", "10"],
                cwd=folder,
                capture_output=True,
                timeout=600,
            )


def run_on_stack(stack: Deployment, workers: int, articles: int) -> ComposeRun:
    containers = stack.containers()
    cpu_before = {s: stack.read(cid, _CGROUP_CPU) for s, cid in containers.items()}
    with OrchestratorClient(f"127.0.0.1:{stack.port}", "admin", stack.password) as client:
        started = time.perf_counter()
        finished = None
        for event in client.run_job(job(articles, workers)):
            if event.WhichOneof("event") == "run_finished":
                finished = event.run_finished
        wall = time.perf_counter() - started
    cpu = {s: (stack.read(cid, _CGROUP_CPU) - cpu_before[s]) / 1e9 for s, cid in containers.items()}
    if finished is None or not finished.ok:
        raise SystemExit(f"benchmark run failed: {finished.error if finished else 'no end'}")
    s = finished.summary
    return ComposeRun(articles, wall, s.api_calls, s.failed_articles, cpu)


def run_pool(workers: int, articles: int, latency: float, seed: int) -> tuple[float, int, int]:
    """The thread pool on a local simulator: (wall, model calls titles included, failed)."""
    with (
        tempfile.TemporaryDirectory(prefix="tierwriter-baseline-") as tmp,
        LlmSimulator(SimulatorConfig(latency=latency, seed=seed)) as simulator,
    ):
        run = run_baseline(
            simulator.base_url, workers, articles, TIER, PROJECT, Path(tmp) / "baseline.db"
        )
        return run.wall, simulator.stats().requests, run.failed


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def table(stack: Deployment, latency: float, workers: list[int], repeats: int, seed: int) -> None:
    print(f"\ndocker-compose stack, {latency} s a call, {repeats} repeat(s):\n")
    what = "wall" if latency else "articles/s"
    print(
        f"| W | N | compose {what} | thread pool {what} | ratio | efficiency compose "
        "| efficiency thread pool | calls/article (titles incl.) "
        "| container CPU ms/article | failed |"
    )
    print("|---:" * 10 + "|")
    for w in workers:
        n = 500 if w >= 50 or not latency else 100
        ours = [run_on_stack(stack, w, n) for _ in range(repeats)]
        peer = [run_pool(w, n, latency, seed) for _ in range(repeats)]
        our_wall = [r.wall for r in ours]
        peer_wall = [wall for wall, _, _ in peer]
        ideal = ideal_bound(n, w, latency)
        if latency:
            shown = (spread(our_wall, seconds), spread(peer_wall, seconds))
            ratio = statistics.median(our_wall) / statistics.median(peer_wall)
            efficiency = (
                spread([ideal / v for v in our_wall], lambda v: f"{v:.2f}"),
                spread([ideal / v for v in peer_wall], lambda v: f"{v:.2f}"),
            )
        else:
            shown = (
                spread([n / v for v in our_wall], lambda v: f"{v:.0f}"),
                spread([n / v for v in peer_wall], lambda v: f"{v:.0f}"),
            )
            ratio = statistics.median(peer_wall) / statistics.median(our_wall)
            efficiency = ("-", "-")
        calls = (
            f"{statistics.median(r.api_calls / n for r in ours):.2f} vs "
            f"{statistics.median(c / n for _, c, _ in peer):.2f}"
        )
        cpu = statistics.median(1000 * sum(r.cpu_seconds.values()) / n for r in ours)
        by_service = ", ".join(
            f"{s} {statistics.median(1000 * r.cpu_seconds.get(s, 0.0) / n for r in ours):.1f}"
            for s in SERVICES
        )
        failed = f"{sum(r.failed for r in ours)} vs {sum(f for _, _, f in peer)}"
        print(
            f"| {w} | {n} | {shown[0]} | {shown[1]} | {ratio:.2f}x | {efficiency[0]} "
            f"| {efficiency[1]} | {calls} | {cpu:.1f} ({by_service}) | {failed} |",
            flush=True,
        )


def peak_memory(stack: Deployment) -> None:
    containers = stack.containers()
    peaks = {s: stack.read(cid, _CGROUP_PEAK) / 2**20 for s, cid in containers.items()}
    services = ", ".join(f"{s} {peaks[s]:.0f} MB" for s in SERVICES if s in peaks)
    print(f"\nPeak memory of the containers over the runs above: {services}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.25, 0.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if shutil.which("docker-compose") is None:
        raise SystemExit("needs docker-compose and a Docker engine (../shared/docker/engine.sh up)")
    for latency in args.latencies:
        with deployed(latency) as stack:
            table(stack, latency, args.workers, args.repeats, args.seed)
            peak_memory(stack)


if __name__ == "__main__":
    main()
