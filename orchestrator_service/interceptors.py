"""Server interceptors of the public API: who calls (authentication), and what our errors mean
as status codes. The servicer's methods then hold only what differs between them.

- `ErrorCodes` maps the exceptions the layers under the servicer raise onto status codes, once
  for every method: a dependency's answer (ServiceCallError), a bad job or project file
  (JobFileError), failed credentials and the login brake.
- `Authentication` checks the credentials of every call but Login and Logout (which checks the
  token it ends itself; health and reflection stay open too) and hands the caller to the
  method: `caller()` inside it. A stream checks them again as it goes (`recheck_caller()`)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from orchestrator_service.auth import (
    Authenticator,
    NotAuthenticatedError,
    Principal,
    ThrottledError,
)
from orchestrator_service.jobfile import JobFileError
from tierwriter import runtime
from tierwriter.runtime import ServiceCallError

SERVICE_PREFIX = "/tierwriter.orchestrator.v1.OrchestratorService/"
# Login makes credentials; Logout checks the token it ends itself (its account may be disabled).
OPEN_METHODS = frozenset({f"{SERVICE_PREFIX}Login", f"{SERVICE_PREFIX}Logout"})

# Codes of a dependency that a client of ours should see as they are; anything else means our
# dependency is in trouble, which to our client is UNAVAILABLE.
_PASSED_THROUGH = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # busy (e.g. password checks): the client retries later
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}

_caller: contextvars.ContextVar[Principal] = contextvars.ContextVar("caller")
# How often a stream (a watch, an export) checks again that its caller's credentials still hold:
# before each response, and from inside a watch that waits (recheck_caller).
RECHECK_SECONDS = 30.0


def caller() -> Principal:
    """Who makes the current call (set by Authentication before the method runs)."""
    return _caller.get()


def abort_for(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    """End the call with the status code that `error` means to our client; re-raise what has
    none (a bug: gRPC answers UNKNOWN and the service logs it)."""
    if isinstance(error, ServiceCallError):
        if error.code in _PASSED_THROUGH:
            runtime.abort(context, error.code, error.details)  # type: ignore[arg-type]
        runtime.abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
    if isinstance(error, JobFileError):
        runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, NotAuthenticatedError):
        runtime.abort(context, grpc.StatusCode.UNAUTHENTICATED, str(error))
    if isinstance(error, ThrottledError):
        runtime.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    raise error


_MAPPED = (ServiceCallError, JobFileError, NotAuthenticatedError, ThrottledError)
Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _wrapped(
    handler: grpc.RpcMethodHandler,
    around: Callable[[Behavior, Any, grpc.ServicerContext], Any],
    around_stream: Callable[[Behavior, Any, grpc.ServicerContext], Iterator[Any]],
) -> grpc.RpcMethodHandler:
    """The handler with its behavior run inside `around` (unary responses) or `around_stream`
    (streamed responses). The public API has unary requests only."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: around(inner, request, context),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            lambda request, context: around_stream(inner_stream, request, context),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorCodes(grpc.ServerInterceptor):
    """Our exceptions as status codes, for every method of the public API."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        return _wrapped(handler, self._call, self._stream)

    @staticmethod
    def _call(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except _MAPPED as e:
            abort_for(context, e)

    @staticmethod
    def _stream(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except _MAPPED as e:
            abort_for(context, e)


class Authentication(grpc.ServerInterceptor):
    """The caller of every method but the OPEN_METHODS, from the call's credentials;
    UNAUTHENTICATED (or RESOURCE_EXHAUSTED from the login brake) before the method runs, and
    for a stream also once they lapse while it runs. Registered after ErrorCodes, so its errors
    are mapped there."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or method in OPEN_METHODS:
            return handler
        return _wrapped(handler, self._call, self._stream)

    def _authenticate(self, context: grpc.ServicerContext) -> Principal:
        metadata = context.invocation_metadata()
        return self._auth.authenticate(metadata, self._auth.address(context.peer(), metadata))

    def _call(self, behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
        token = _caller.set(self._authenticate(context))
        try:
            return behavior(request, context)
        finally:
            _caller.reset(token)

    def _stream(
        self, behavior: Behavior, request: Any, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        principal = self._authenticate(context)
        still_allowed = _Recheck(self._auth, context, principal)
        responses = iter(behavior(request, context))
        try:
            while True:
                # Set around each step: gRPC may resume the stream from another context.
                tokens = (_caller.set(principal), _recheck.set(still_allowed))
                try:
                    response = next(responses)
                except StopIteration:
                    return
                finally:
                    _recheck.reset(tokens[1])
                    _caller.reset(tokens[0])
                still_allowed()  # nothing more goes out once the credentials lapsed
                yield response
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # the method's own cleanup (a watch's slot) runs now, not at collection


class _Recheck:
    """A stream's check that its caller's credentials still hold, done at most every
    RECHECK_SECONDS: NotAuthenticatedError once they lapsed (see Authenticator.recheck)."""

    def __init__(
        self, auth: Authenticator, context: grpc.ServicerContext, opened: Principal
    ) -> None:
        self._auth, self._context, self._opened = auth, context, opened
        self._checked = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._checked < RECHECK_SECONDS:
            return
        metadata = self._context.invocation_metadata()
        address = self._auth.address(self._context.peer(), metadata)
        self._auth.recheck(metadata, address, self._opened)
        self._checked = time.monotonic()


_recheck: contextvars.ContextVar[_Recheck] = contextvars.ContextVar("recheck")


def recheck_caller() -> None:
    """Inside a stream that may wait long between responses (a watch of a quiet job): end it
    with NotAuthenticatedError once its caller's credentials lapsed (at most every
    RECHECK_SECONDS; a no-op outside a stream)."""
    check = _recheck.get(None)
    if check is not None:
        check()
