"""Service-to-service trust: generator_service and persistence_service answer only callers that
present the shared SERVICE_TOKEN (metadata `x-tierwriter-service-token`). Health and reflection
stay open, so probes work. The token is compared in constant time and never logged."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from tierwriter.refused_calls import REFUSED, peer_address

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-tierwriter-service-token"
DENIED = "this service answers only tierwriter's own services (missing or wrong service token)"


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client of an internal service sends with every call."""
    return ((TOKEN_HEADER, token),) if token else ()


def is_loopback(address: str) -> bool:
    """Whether a listen address only accepts connections from this machine."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def required_token(token: str | None, address: str, service: str) -> str | None:
    """The token a service must demand. Without one it may only listen on loopback (a local
    development setup); anywhere else it refuses to start."""
    if token:
        return token
    if is_loopback(address):
        log.warning("%s: SERVICE_TOKEN is not set; answering any caller on %s", service, address)
        return None
    raise ValueError(
        f"{service}: SERVICE_TOKEN must be set to listen on {address} (it answers only "
        "tierwriter's own services); use the same value for all three services"
    )


class ServiceTokenInterceptor(grpc.ServerInterceptor):
    """Denies calls to `services` (full names) that do not carry the token: UNAUTHENTICATED."""

    def __init__(self, token: str, services: Sequence[str]) -> None:
        self._token = token.encode()
        self._prefixes = tuple(f"/{name}/" for name in services)

    def _authorised(self, metadata: Sequence[Any] | None) -> bool:
        presented = next((value for key, value in metadata or () if key == TOKEN_HEADER), "")
        return hmac.compare_digest(str(presented).encode(), self._token)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self._prefixes):
            return handler
        if self._authorised(handler_call_details.invocation_metadata):  # type: ignore[attr-defined]
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends every call UNAUTHENTICATED. It takes
    the request as raw bytes: a stranger's call is never parsed, so garbage costs no parse; it
    is logged once per client and minute, with a count."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        REFUSED.note(peer_address(context.peer()), "no valid service token")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    serializers = {"response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **serializers)
    return grpc.unary_unary_rpc_method_handler(deny, **serializers)
