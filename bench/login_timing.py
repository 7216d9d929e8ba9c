"""Login timing through the real services: does a failed login tell whether the account exists?

    python bench/login_timing.py               # 40 logins of each kind, interleaved
    python bench/login_timing.py --logins 100

On the in-process stack (SQLite), logins with a wrong password for an existing user, for a
disabled user, and for a name with no account are sent one at a time, interleaved, each from an
address of its own (through ORCHESTRATOR_TRUSTED_PROXIES, so the login brake does not hold any
back). Reported per kind: the median and the 10th-90th percentile of the seconds from the call to
its UNAUTHENTICATED answer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.stack import LocalStack, StackConfig
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

KINDS = {
    "existing user, wrong password": ("ann", "wrong-password-123"),
    "disabled user, right password": ("off", "off-password-123"),
    "no such user": ("nobody", "wrong-password-123"),
}


def _timed_login(stub: pb_grpc.OrchestratorServiceStub, client: str, user: str, pw: str) -> float:
    started = time.perf_counter()
    try:
        stub.Login(
            pb.LoginRequest(username=user, password=pw),
            timeout=30,
            metadata=(("x-forwarded-for", client),),
        )
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
    else:
        raise AssertionError(f"{user} logged in")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=40, help="logins of each kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = StackConfig.on_loopback(
            database_url=f"sqlite:///{Path(tmp) / 'db.sqlite'}",
            output_dir=Path(tmp) / "output",
            simulator=SimulatorConfig(),
            admin_password="admin-password-123",
            orchestrator_settings={"trusted_proxies": "127.0.0.1"},
        )
        with LocalStack(config) as stack:
            with OrchestratorClient(stack.orchestrator_address, "admin", "admin-password-123") as a:
                a.create_user("ann", "ann-password-123")
                a.create_user("off", "off-password-123")
                a.set_user_active("off", False)
            times: dict[str, list[float]] = {kind: [] for kind in KINDS}
            with grpc.insecure_channel(stack.orchestrator_address) as channel:
                stub = pb_grpc.OrchestratorServiceStub(channel)
                for n in range(args.logins):
                    for k, (kind, (user, password)) in enumerate(KINDS.items()):
                        client = f"10.{k}.{n // 250}.{n % 250 + 1}"
                        times[kind].append(_timed_login(stub, client, user, password))
    print(f"{args.logins} logins of each kind, interleaved, one at a time:")
    for kind, seconds in times.items():
        deciles = statistics.quantiles(seconds, n=10)
        print(
            f"  {kind:<32} median {statistics.median(seconds) * 1000:6.1f} ms   "
            f"p10-p90 {deciles[0] * 1000:6.1f}-{deciles[-1] * 1000:6.1f} ms"
        )


if __name__ == "__main__":
    main()
