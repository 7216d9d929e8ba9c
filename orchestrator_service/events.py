"""A job's event stream: numbered, stored, and readable from any point by any orchestrator.

The orchestrator running a job appends its events to a JobEventLog: each gets the next sequence
number, and a writer thread stores them in batches, under the run's lease epoch. Watchers are
served stored events only: live watchers on this orchestrator get each batch as soon as it is
stored, so nobody is ever shown an event the database refused (an orchestrator that lost its
lease while paused finds its events refused, and its run ends: invariant 10). A watcher anywhere
reads the stored events after the last one it saw (WatchJob), then follows the live log when
the job runs where it is connected, or polls the database when it runs on another one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc

from persistence_service.client import PersistenceClient
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.runtime import ServiceCallError
from tierwriter.statuses import ACTIVE_JOB_STATUSES

log = logging.getLogger(__name__)

# How long the writer gathers events into one batch (what a live watcher waits at most, beyond
# the store itself), and how often a watcher of a job that runs elsewhere (or waits in the
# queue) asks the database for new ones.
FLUSH_SECONDS = 0.1
POLL_SECONDS = 1.0
LOCAL_CHECK_SECONDS = 0.1
# Stored events a log keeps in memory for watchers close behind; one further back reads the
# database. Keeps an orchestrator's memory flat however long a job is.
KEPT_STORED_EVENTS = 1000


class JobEventLog:
    """The events of one run of a job on this orchestrator. Thread-safe: the job's thread emits,
    the writer stores, any number of watchers read."""

    def __init__(
        self,
        job_id: int,
        first_seq: int,
        store: Callable[[int, Sequence[tuple[int, bytes]]], object],
        on_fenced: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`store(job_id, [(seq, payload), …])` stores a batch under the run's lease epoch;
        `on_fenced(reason)` is told once persistence refuses that epoch."""
        self.job_id = job_id
        self.first_seq = first_seq  # numbers up to this one belong to earlier runs
        self._store = store
        self._on_fenced = on_fenced
        self._fenced = False  # the epoch was refused: nothing more is kept or shown
        self._cond = threading.Condition()
        # Events from seq first_seq + dropped + 1 on; the stored ones beyond the newest
        # KEPT_STORED_EVENTS are dropped.
        self._events: list[pb.JobEvent] = []
        self._dropped = 0
        self._stored = first_seq  # the last stored seq
        self._ended = False  # no more events: the writer stores the rest and stops
        self._closed = False  # and watchers here stop following the log
        self._writer = threading.Thread(target=self._write, name=f"job{job_id}-events")
        self._writer.start()

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._last_seq()

    def _last_seq(self) -> int:
        return self.first_seq + self._dropped + len(self._events)

    def _index(self, seq: int) -> int:
        """Where the event after `seq` is in self._events (negative: dropped already)."""
        return seq - self.first_seq - self._dropped

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def emit(self, event: pb.JobEvent) -> pb.JobEvent:
        """Number the event and hand it to the writer (watchers see it once it is stored)."""
        with self._cond:
            if self._fenced:
                return event  # the run is over: the database would refuse it
            event.seq = self._last_seq() + 1
            event.job_id = self.job_id
            self._events.append(event)
            self._cond.notify_all()
        return event

    def read(self, after_seq: int, timeout: float) -> tuple[list[pb.JobEvent], bool] | None:
        """Stored events after `after_seq` (waiting up to `timeout` for one), and whether the
        log is closed with nothing more to come; None when events after `after_seq` were dropped
        from memory (read them from the database)."""
        with self._cond:
            if self._index(max(after_seq, self.first_seq)) < 0:
                return None
            if after_seq >= self._stored and not self._closed:
                self._cond.wait(timeout)
                if self._index(max(after_seq, self.first_seq)) < 0:
                    return None
            start = self._index(max(after_seq, self.first_seq))
            events = self._events[start : max(start, self._index(self._stored))]
            return events, self._closed and not events

    def end(self) -> None:
        """No more events: return once every event is stored (a failure to store is logged:
        the writer already retried for DATABASE_WAIT_SECONDS). Watchers go on following the
        log until close(), which comes once the job's final status is stored too."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        self._writer.join()

    def close(self) -> None:
        """End the log (storing what is left) and let its watchers go."""
        self.end()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _fence(self, reason: str) -> None:
        """Another orchestrator holds the job: what was not stored is dropped, unseen, and the
        watchers here go to the database, which has the other run's events."""
        log.warning("job %d: events refused (%s): this run of the job ends", self.job_id, reason)
        with self._cond:
            self._fenced = True
            del self._events[self._index(self._stored) :]
            self._closed = True
            self._cond.notify_all()
        self._on_fenced(reason)

    def _write(self) -> None:
        while True:
            with self._cond:
                while self._stored >= self._last_seq() and not self._ended:
                    self._cond.wait()
                ended = self._ended
            if not ended:
                threading.Event().wait(FLUSH_SECONDS)  # gather a batch
            with self._cond:
                batch = self._events[self._index(self._stored) :]
                ended = self._ended
            if batch:
                try:
                    self._store(self.job_id, [(e.seq, e.SerializeToString()) for e in batch])
                except ServiceCallError as e:
                    if e.code == grpc.StatusCode.ABORTED:  # a stale lease epoch: fenced
                        self._fence(str(e))
                        return
                    # The client retried for DATABASE_WAIT_SECONDS already.
                    log.error("job %d: could not store %d events: %s", self.job_id, len(batch), e)
                    if ended:
                        return
                    threading.Event().wait(FLUSH_SECONDS)
                    continue
                with self._cond:
                    self._stored = batch[-1].seq
                    self._cond.notify_all()  # live watchers: these are stored now
                    extra = self._index(self._stored) - KEPT_STORED_EVENTS
                    if extra > 0:  # stored and far behind: the database has them
                        del self._events[:extra]
                        self._dropped += extra
            elif ended:
                return


def watch(
    job_id: int,
    after_seq: int,
    persistence: PersistenceClient,
    local_log: Callable[[int], JobEventLog | None],
    active: Callable[[], bool],
) -> Iterator[pb.JobEvent]:
    """A job's events after `after_seq`: the stored ones, then live ones, until the job is no
    longer queued or running (every event of a finished job is stored before its status is).
    `local_log` finds the job's log when it runs here; `active` turns false when the watcher
    should stop (its client left, or the server is stopping)."""
    seq = after_seq
    while active():
        live = local_log(job_id)
        read = live.read(seq, POLL_SECONDS) if live is not None and seq >= live.first_seq else None
        if read is not None:
            events, closed = read
            for event in events:
                seq = event.seq
                yield event
            if not closed:
                continue
        # From the database: what was stored before this run, or all of a job running elsewhere.
        page = persistence.list_events(job_id, seq)
        for record in page.events:
            event = pb.JobEvent.FromString(record.payload)
            seq = record.seq
            yield event
        if page.events:
            continue
        live = local_log(job_id)
        if live is not None and not live.closed and seq < live.first_seq:
            seq = live.first_seq  # numbers skipped at a takeover: no event has them
            continue
        if page.status not in ACTIVE_JOB_STATUSES:
            return
        # Queued, or running elsewhere: ask the database again shortly, or follow the job here
        # as soon as this orchestrator starts it.
        for _ in range(round(POLL_SECONDS / LOCAL_CHECK_SECONDS)):
            live = local_log(job_id)
            if (live is not None and not live.closed) or not active():
                break
            threading.Event().wait(LOCAL_CHECK_SECONDS)
