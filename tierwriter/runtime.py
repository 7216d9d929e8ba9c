"""What all three services share: gRPC server bootstrap with health and reflection, graceful stop,
deadlines-by-default channels, and logging set up once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tierwriter.refused_calls import ParsedHere

log = logging.getLogger("tierwriter")

# Large enough for a long article with its outline; a cap keeps one bad message from eating memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

Registrar = Callable[[Any, grpc.Server], None]
QUEUED_CALLS_PER_THREAD = 4


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer and the port it bound."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: Sequence[str]
    executor: ThreadPoolExecutor
    # Resources the servicers use (clients, engines, an embedded simulator): closed after the
    # server has stopped, in reverse order of registration.
    closers: list[Callable[[], None]] = field(default_factory=list)

    def set_serving(self) -> None:
        """Report SERVING for every service (a server built with serving=False is ready now)."""
        for name in [*self.service_names, ""]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within `grace`, then release the rest."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for close in reversed(self.closers):
            close()


def build_server(
    address: str,
    services: Iterable[tuple[Registrar, Any, str]],
    *,
    max_workers: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    closers: Sequence[Callable[[], None]] = (),
    serving: bool = True,
    tls: tuple[bytes, bytes] | None = None,
) -> RunningServer:
    """Bind `address` (port 0 picks a free one), register each (add_fn, servicer, full service
    name) plus health and reflection, start, and mark every service SERVING — or, with
    serving=False, NOT_SERVING until the caller's set_serving() (a dependency is not ready).
    With `tls` (PEM key, PEM certificate chain) the port serves TLS only."""
    # gRPC's own parse errors (streamed requests; ParsedHere parses the rest): a line a minute
    # with a count, not a traceback a request.
    if _MALFORMED_REQUESTS not in logging.getLogger("grpc._common").filters:
        logging.getLogger("grpc._common").addFilter(_MALFORMED_REQUESTS)
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
    server = grpc.server(
        executor,
        # Innermost: the given interceptors refuse strangers before a request is parsed.
        interceptors=[*interceptors, ParsedHere()],
        options=CHANNEL_OPTIONS,
        # Calls beyond the threads wait their turn (a burst of saves must not fail); only a
        # backlog past this is refused with RESOURCE_EXHAUSTED, so memory stays bounded.
        maximum_concurrent_rpcs=max_workers * QUEUED_CALLS_PER_THREAD,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names: list[str] = []
    for add_to_server, servicer, name in services:
        add_to_server(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    if port == 0:
        executor.shutdown(wait=False)
        for close in reversed(closers):
            close()
        raise OSError(f"cannot listen on {address}: the address is taken or invalid")
    server.start()
    running = RunningServer(server, health_servicer, port, names, executor, list(closers))
    if serving:
        running.set_serving()
    else:
        for name in [*names, ""]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return running


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with `code` and `message`. context.abort raises; this says so to the type
    checker, so code after it knows the call ended."""
    context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")


# Set by LocalStack(processes=True) in the environment of the services it starts: the PID of
# the `tierwriter up` that started them. A service whose starter is gone (killed with SIGKILL,
# so it could not stop them) stops too, instead of running on unowned.
PARENT_PID_VARIABLE = "TIERWRITER_PARENT_PID"


def _parent_gone() -> bool:
    expected = os.environ.get(PARENT_PID_VARIABLE)
    return bool(expected) and os.getppid() != int(expected or 0)


def wait_for_stop_signal(on_ready: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C), or until the process that started this one as
    part of `tierwriter up` is gone; the caller then stops its servers gracefully. `on_ready`
    runs once the signals are caught, e.g. to report SERVING only then."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            if _parent_gone():
                log.warning("the tierwriter up that started this service is gone, stopping")
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve_until_stopped(
    running: RunningServer, name: str, on_ready: Callable[[], None] | None = None
) -> None:
    """The body of every service's `serve`: run until SIGTERM/SIGINT, then stop gracefully."""
    log.info("%s listening on port %d", name, running.port)
    try:
        wait_for_stop_signal(on_ready)
    finally:
        running.stop()


def host_port(address: str, port: int) -> str:
    """The dialable address of a server bound to `address` (whose port may have been 0)."""
    host = address.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def open_channel(
    address: str, root_certificates: bytes | None = None, server_name: str = ""
) -> grpc.Channel:
    """A channel with the shared message-size caps: TLS trusting `root_certificates` (PEM) when
    given, else plaintext; with `server_name`, the certificate must name that host rather than
    the address dialled (a probe dialling 127.0.0.1 of a server named tierwriter.example.com).
    Calls are spread round-robin over every address the name resolves to (several generator
    replicas behind one DNS name)."""
    options = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
    if root_certificates is None:
        return grpc.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(address, credentials, options=options)


def read_tls_files(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """(key, certificate) PEM bytes for build_server(tls=…); ValueError naming the file and the
    setting when one cannot be read or is not PEM."""
    loaded: list[bytes] = []
    for path, setting in ((key_file, "TLS_KEY_FILE"), (cert_file, "TLS_CERT_FILE")):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{setting}: cannot read {path}: {e.strerror}") from e
        if b"-----BEGIN " not in data:
            raise ValueError(f"{setting}: {path} is not a PEM file")
        loaded.append(data)
    return loaded[0], loaded[1]


class MalformedRequestLog(logging.Filter):
    """gRPC logs a full ERROR traceback for each request it cannot parse; a flood of garbage
    would bury everything else. The first in a minute becomes one WARNING line, the rest of
    that minute are counted, and the next line says how many there were."""

    WINDOW_SECONDS = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Exception deserializing"):
            return True
        with self._lock:
            if record.created - self._window_start < self.WINDOW_SECONDS:
                self._suppressed += 1
                return False
            self._window_start, earlier = record.created, self._suppressed
            self._suppressed = 0
        reason = record.exc_info[1] if record.exc_info else "unreadable bytes"
        more = f" ({earlier} more in the minute before)" if earlier else ""
        record.msg, record.args = f"a request that cannot be parsed: %s{more}", (reason,)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


_MALFORMED_REQUESTS = MalformedRequestLog()


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with thread names (workers interleave); idempotent."""
    root = logging.getLogger()
    if not any(getattr(h, "_tierwriter", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
        )
        handler._tierwriter = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())


class CallFailure(grpc.RpcError):
    """A failure a client decides itself, with a status code as if the service had answered it
    (no replica answers; a stream ended with work in flight): ServiceCallError reads it as it
    reads a grpc.Call's."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ServiceCallError(Exception):
    """A call to one of our services failed; the message says which service, where, and what
    to do. `code` is the gRPC status code for callers that branch on it."""

    def __init__(self, service: str, address: str, error: grpc.RpcError) -> None:
        self.service = service
        self.address = address
        call = isinstance(error, grpc.Call | CallFailure)
        self.code: grpc.StatusCode | None = error.code() if call else None  # type: ignore[union-attr]
        self.details: str = (error.details() if call else str(error)) or ""  # type: ignore[union-attr]
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.code == grpc.StatusCode.UNAVAILABLE:
            hint = " (is it running?)" if "connect" in self.details.lower() else ""
            return f"{self.service} at {self.address} is unavailable{hint}: {self.details}"
        if self.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{self.service} at {self.address} did not answer in time"
        name = self.code.name if self.code else "error"
        return f"{self.service} at {self.address} answered {name}: {self.details}"
