"""PersistenceSaver: the pipeline's ArticleSaver, backed by persistence_service."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

import grpc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from generator_service.domain import ArticleRecord
from generator_service.lease import LeaseLostError
from persistence_service.client import PersistenceClient, outline_to_proto
from tierwriter.persistence.v1 import persistence_service_pb2 as persistence_pb
from tierwriter.runtime import ServiceCallError
from tierwriter.statuses import article_status

log = logging.getLogger(__name__)
# Each try already waits for persistence (wait_for_ready, up to the client's deadline); a save
# keeps trying this long in all before the article's record is given up.
SAVE_RETRY_SECONDS = 180.0
# One SaveArticles call carries at most this many records and (past its first) this many bytes.
SAVE_BATCH_RECORDS = 200
SAVE_BATCH_BYTES = 1024 * 1024


class ArticleNotSavedError(Exception):
    """Persistence refused this one record (invalid, or its job does not exist)."""


def _persistence_down(error: BaseException) -> bool:
    """Persistence is away for now: not there, too slow, or stopping with the call in flight (a
    server that stops cancels what it serves: CANCELLED, though this side cancelled nothing).
    A save is idempotent on its key, so trying again is safe."""
    return isinstance(error, ServiceCallError) and error.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    )


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("saving articles failed (%s); trying again", error)


@dataclass
class _Save:
    """One save waiting for the writer: the record, and the future its worker waits on."""

    request: persistence_pb.SaveArticleRequest
    size: int
    done: Future[tuple[int, bool]] = field(default_factory=Future)


_CLOSE = object()


class PersistenceSaver:
    """Saves terminal records through SaveArticles, idempotent on the article's key (a save
    repeated after a lost reply stores nothing twice), riding out a persistence restart.

    Group commit: one writer thread sends the saves; those that arrive while a call is on its
    way go together in the next one, in one transaction. A lone save goes at once, so this
    only shares commits and round trips when workers finish together — the many-worker case,
    where one commit and one gRPC call per article cost the most. `save` still returns only
    once its record is stored, so a SAVED event never goes out before the row exists."""

    def __init__(
        self, client: PersistenceClient, retry_seconds: float = SAVE_RETRY_SECONDS
    ) -> None:
        self._client = client
        self._retrying = Retrying(
            stop=stop_after_delay(retry_seconds),
            wait=wait_exponential(multiplier=0.5, max=10),
            retry=retry_if_exception(_persistence_down),
            before_sleep=_log_retry,
            reraise=True,
        )
        self._pending: queue.SimpleQueue[_Save | object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders saves against close: none is queued after it
        self._closed = False
        self._writer = threading.Thread(target=self._write, name="article-saver", daemon=True)
        self._writer.start()

    def save(
        self, record: ArticleRecord, replace_failed: bool = False, lease_epoch: int = 0
    ) -> tuple[int, bool]:
        """Store one record written under the job's lease epoch `lease_epoch`; (article id,
        whether this save stored it). Blocks until stored. LeaseLostError when persistence
        refused the epoch as stale (another orchestrator holds the job)."""
        fields = asdict(record)
        outline, status = fields.pop("outline"), fields.pop("status")
        article = persistence_pb.Article(
            **fields, status=article_status(status), outline=outline_to_proto(outline)
        )
        request = persistence_pb.SaveArticleRequest(
            article=article, replace_failed=replace_failed, lease_epoch=lease_epoch
        )
        waiting = _Save(request, request.ByteSize())
        with self._lock:
            if self._closed:
                raise ArticleNotSavedError("the generator is shutting down")
            self._pending.put(waiting)
        return waiting.done.result()

    def close(self) -> None:
        """Stop the writer once the saves queued before this are done."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.put(_CLOSE)
        self._writer.join()

    def _write(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = self._retrying.copy()(
                    self._client.save_articles, [s.request for s in batch]
                )
                if len(results) != len(batch):
                    raise ArticleNotSavedError(
                        f"persistence answered {len(results)} saves for {len(batch)}"
                    )
                for waiting, result in zip(batch, results, strict=True):
                    if result.lease_lost:
                        waiting.done.set_exception(LeaseLostError(result.error))
                    elif result.error:
                        waiting.done.set_exception(ArticleNotSavedError(result.error))
                    else:
                        waiting.done.set_result((result.article_id, result.created))
            except Exception as e:  # persistence stayed down or refused the call: each worker
                for waiting in batch:  # still waiting reports its article as not saved
                    if not waiting.done.done():
                        waiting.done.set_exception(e)

    def _next_batch(self) -> list[_Save] | None:
        """The next save (waiting for one) and whatever else is queued behind it, up to the
        batch limits; None once closed."""
        first = self._pending.get()
        if not isinstance(first, _Save):
            return None
        batch, size = [first], first.size
        while len(batch) < SAVE_BATCH_RECORDS and size < SAVE_BATCH_BYTES:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, _Save):
                self._pending.put(item)  # close after this batch: nothing is queued behind it
                break
            batch.append(item)
            size += item.size
        return batch
