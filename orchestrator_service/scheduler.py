"""JobScheduler: which jobs this orchestrator runs, through leases in the database.

Every orchestrator on a database runs one scheduler. Each tick it renews the leases of the jobs
it runs (learning which were asked to cancel, and which another orchestrator took over: those
runs are fenced, as their writes would be refused), then
claims what it has room for: running jobs whose lease expired (their orchestrator died) and
queued jobs, in order, within each user's limit. A submit, a resume or a finished job wakes it
at once; otherwise it ticks every third of the lease."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from orchestrator_service.config import Settings
from orchestrator_service.runner import JobRunner
from persistence_service.client import PersistenceClient
from tierwriter.runtime import ServiceCallError

log = logging.getLogger(__name__)


def new_orchestrator_id() -> str:
    """This process's name on the leases it holds, unique per start: host (in a container, its
    id), process id and a random part, so `jobs show` says where a job runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobScheduler:
    """Claims jobs for a JobRunner and keeps their leases; one thread, started and stopped."""

    def __init__(
        self, runner: JobRunner, persistence: PersistenceClient, settings: Settings
    ) -> None:
        self._runner = runner
        self._persistence = persistence
        self._settings = settings
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)

    def start(self) -> JobScheduler:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look for work now (a job was queued or one ended)."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Claim nothing more, hand off the jobs running here (in-flight articles finish and
        are recorded), and let go of their leases so another orchestrator (or this one, started
        again) carries them on at once."""
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        handed_off = self._runner.close(timeout)
        if handed_off:
            try:
                self._persistence.renew_leases(self._runner.owner, handed_off, 0.0)
            except ServiceCallError as e:
                log.warning("could not let go of the leases of jobs %s: %s", list(handed_off), e)

    def _loop(self) -> None:
        interval = self._settings.lease_seconds / 3
        while not self._stopping.is_set():
            try:
                self.tick()
            except ServiceCallError as e:  # persistence is down: the leases run on meanwhile
                log.warning("job scheduler: %s", e)
            except Exception:  # never let the thread die: the jobs' leases depend on it
                log.exception("job scheduler: unexpected error")
            self._wake.wait(interval)
            self._wake.clear()

    def tick(self) -> None:
        """Renew, then claim."""
        owner, lease = self._runner.owner, self._settings.lease_seconds
        running = self._runner.running_leases()
        if running:
            renewed = self._persistence.renew_leases(owner, running, lease)
            for job_id in set(running) - set(renewed.held):
                self._runner.fence(job_id, "another orchestrator took the job over")
            for cancel in renewed.cancels:
                self._runner.cancel(cancel.job_id, cancel.reason)
        room = self._settings.max_running_jobs - len(self._runner.running_ids())
        if room <= 0 or self._stopping.is_set():
            return
        claimed = self._persistence.claim_jobs(owner, lease, self._settings.jobs_per_user, room)
        for c in claimed:
            if c.taken_over:
                log.warning(
                    "job %d: taken over from %s (its lease expired)", c.job.id, c.previous_owner
                )
            self._runner.start(c.job, c.previous_owner)
