"""Calls refused for who sent them or what they sent — no credentials, a wrong service token, a
failed login, bytes that are not a request — are logged once per client and kind a minute, with
a count: a flood of them cannot bury the log, and each line says where they came from.

`ParsedHere` makes the last kind visible: gRPC parses a request before any of our code sees the
call, and logs a traceback without the client when it cannot. With it, unary requests reach our
handler as bytes and are parsed there, where the client is known."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger("tierwriter.refused_calls")


def canonical_ip(text: str) -> str | None:
    """An IP address in one form whatever way it was written (an IPv4-mapped IPv6 address,
    "::ffff:10.0.0.5" from a dual-stack socket, as its IPv4; no IPv6 zone); None if not one."""
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_address(peer: str) -> str:
    """The address in gRPC's `peer()` ("ipv4:10.0.0.5:4711", "ipv6:%5B::1%5D:4711" — gRPC
    percent-encodes the brackets), without its port and in canonical form; anything else
    ("unix:…") as it is."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    if scheme == "ipv6" and rest.startswith("["):
        host = rest[1 : rest.find("]")]
    elif scheme == "ipv4":
        host = rest.rpartition(":")[0]
    else:
        return peer
    return canonical_ip(host) or peer


class RefusedCalls:
    """One WARNING line per (client, kind) a minute: the first refusal at once, later ones in
    that minute counted, and the next line says how many there were. The least recently seen
    keys are dropped beyond `max_tracked`, so many clients cannot grow it without bound."""

    WINDOW_SECONDS = 60.0

    def __init__(
        self,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 10_000,
    ) -> None:
        self._log = logger
        self._clock = clock
        self._max_tracked = max_tracked
        self._lock = threading.Lock()
        # (client, kind) → (start of its window, refusals since not logged)
        self._windows: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def note(self, client: str, kind: str, detail: str = "") -> None:
        """A call from `client` was refused for `kind` (a few words; `detail` adds to the line
        that is logged)."""
        key = (client, kind)
        with self._lock:
            now = self._clock()
            start, unlogged = self._windows.get(key, (float("-inf"), 0))
            if now - start < self.WINDOW_SECONDS:
                self._windows[key] = (start, unlogged + 1)
                return
            self._windows[key] = (now, 0)
            self._windows.move_to_end(key)
            while len(self._windows) > self._max_tracked:
                self._windows.popitem(last=False)
        more = f" ({unlogged} more in the minute before)" if unlogged else ""
        self._log.warning(
            "refused a call from %s: %s%s%s", client, kind, f": {detail}" if detail else "", more
        )

    def forget(self) -> None:
        """Start every window afresh: the next refusal of each kind is logged (a clean slate
        for a test)."""
        with self._lock:
            self._windows.clear()


REFUSED = RefusedCalls()  # one per process: every server and check of it reports here


class ParsedHere(grpc.ServerInterceptor):
    """Unary requests are parsed in the handler instead of by gRPC: one that cannot be parsed is
    INVALID_ARGUMENT (gRPC: INTERNAL) and noted with its client. Register it last, innermost:
    the interceptors before it (credentials, the service token) then refuse a stranger's call
    before its bytes are read. Streamed requests stay gRPC's to parse."""

    def __init__(self, refused: RefusedCalls = REFUSED) -> None:
        self._refused = refused

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        parse = handler.request_deserializer

        def parsed(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return parse(raw)
            except Exception as e:  # protobuf's DecodeError, or worse: the bytes are the problem
                name = method.rsplit("/", 1)[-1]
                self._refused.note(
                    peer_address(context.peer()),
                    f"a request to {method} that cannot be parsed",
                    str(e) or type(e).__name__,
                )
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request cannot be parsed as {name}'s request message",
                )
                raise AssertionError("unreachable: abort raises") from e

        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            unary = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                lambda raw, context: unary(parsed(raw, context), context),
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda raw, context: stream(parsed(raw, context), context),
                response_serializer=serializer,
            )
        return handler
