"""Exit 0 when the gRPC service at ADDRESS reports SERVING, 1 otherwise (container probes).

python -m tierwriter.healthcheck 127.0.0.1:50051 [SERVICE]

In a container that serves TLS (TLS_CERT_FILE is set) the probe speaks TLS too, trusting
TIERWRITER_CA_FILE, else the served certificate itself (right for a self-signed one), and checks
that the certificate names TLS_SERVER_NAME (the host name clients use) when that is set, else the
127.0.0.1 it dials.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierwriter import runtime


def trusted_roots() -> bytes | None:
    """The certificates a probe of this container's TLS service trusts; None without TLS."""
    if not os.environ.get("TLS_CERT_FILE"):
        return None
    ca = os.environ.get("TIERWRITER_CA_FILE")
    # A CA file named but absent (a Kubernetes TLS Secret without ca.crt): the certificate.
    if ca and Path(ca).is_file():
        return Path(ca).read_bytes()
    return Path(os.environ["TLS_CERT_FILE"]).read_bytes()


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    root_certificates: bytes | None = None,
    server_name: str = "",
) -> bool:
    """Whether the health service at `address` says SERVING for `service` ("" = the server);
    over TLS trusting `root_certificates` when given, for a certificate naming `server_name`."""
    with runtime.open_channel(address, root_certificates, server_name) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    service = sys.argv[2] if len(sys.argv) == 3 else ""
    name = os.environ.get("TLS_SERVER_NAME", "")
    roots = trusted_roots()
    sys.exit(0 if check(sys.argv[1], service, root_certificates=roots, server_name=name) else 1)
