"""GeneratorClient: how the orchestrator calls the generator; every call has a deadline."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from tierwriter import runtime
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as pb_grpc
from tierwriter.service_auth import token_metadata

# A titles stream runs beside its tier's articles, on the same model: bounded, but generous.
TITLES_DEADLINE = 3600.0
# A stream carries a whole job: long, but bounded, so a hung generator cannot hang it forever.
ARTICLES_DEADLINE = 24 * 3600.0


class GeneratorClient:
    """A channel to generator_service."""

    def __init__(self, address: str, service_token: str | None = None) -> None:
        self.address = address
        self._metadata = token_metadata(service_token)
        self._channel = runtime.open_channel(address)
        self._stub = pb_grpc.GeneratorServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> runtime.ServiceCallError:
        return runtime.ServiceCallError("generator_service", self.address, error)

    def generate_titles(
        self,
        request: pb.GenerateTitlesRequest,
        on_titles: Callable[[list[str]], None] = lambda titles: None,
    ) -> pb.GenerateTitlesResponse:
        """The tier's titles and their totals, as one message; `on_titles` gets each batch of
        new titles as it streams in (in order), for articles to start on them."""
        merged = pb.GenerateTitlesResponse()
        stream = self._stub.GenerateTitles(
            request, timeout=TITLES_DEADLINE, metadata=self._metadata
        )
        try:
            for message in stream:
                if message.titles:
                    on_titles(list(message.titles))
                merged.MergeFrom(message)  # titles add up; the last message brings the totals
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            stream.cancel()  # a no-op once it ended
        return merged

    def open_articles(self, settings: pb.BatchSettings) -> ArticleStream:
        """A GenerateArticles stream that starts with `settings`; send articles to it as
        workers are free, and read its events."""
        return ArticleStream(self, settings)


_CLOSE = object()


class ArticleStream:
    """One GenerateArticles call to one generator. Any thread may send() articles, stop() or
    close() our side; one thread reads events(). cancel() ends the call outright."""

    def __init__(self, client: GeneratorClient, settings: pb.BatchSettings) -> None:
        self.address = client.address
        self._client = client
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._requests.put(pb.GenerateArticlesRequest(settings=settings))
        self._closed = False
        self._lock = threading.Lock()  # orders sends against close: nothing goes after it
        self._call = client._stub.GenerateArticles(
            self._outgoing(), timeout=ARTICLES_DEADLINE, metadata=client._metadata
        )

    def _outgoing(self) -> Iterator[pb.GenerateArticlesRequest]:
        while (item := self._requests.get()) is not _CLOSE:
            assert isinstance(item, pb.GenerateArticlesRequest)
            yield item

    def _put(self, request: pb.GenerateArticlesRequest) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._requests.put(request)
            return True

    def send(self, article: pb.ArticleRequest) -> bool:
        """Send one article; False once our side is closed."""
        return self._put(pb.GenerateArticlesRequest(article=article))

    def stop(self, reason: str, grace_seconds: float) -> None:
        """Start nothing more: the generator reports articles it has not started SKIPPED; those
        in flight finish (failed as cancelled once they outlive `grace_seconds`; 0: never)."""
        self._put(
            pb.GenerateArticlesRequest(
                stop=pb.StopBatch(reason=reason, grace_seconds=grace_seconds)
            )
        )

    def close(self) -> None:
        """No more articles: the generator ends the stream once those sent are terminal."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._requests.put(_CLOSE)

    def cancel(self) -> None:
        """End the call now (the generator lets articles in flight finish and save)."""
        self.close()
        self._call.cancel()

    def events(self) -> Iterator[article_pb.ArticleEvent]:
        """The stream's events until it ends; ServiceCallError when it breaks."""
        try:
            for response in self._call:
                yield response.event
        except grpc.RpcError as e:
            raise self._client._error(e) from e
