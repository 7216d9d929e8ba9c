"""JobLease: the fencing token a stream's work is done under, checked before work is paid for.

The orchestrator running a job holds its lease under an epoch that every claim raises; what the
generator writes for the job carries that epoch, and persistence refuses a stale one. Refused
saves alone would still let a frozen orchestrator's queued articles be written (and paid for)
by two generators, so each article asks first whether its epoch is still the job's. Those
questions are shared: an article waits for a check that began after it asked, so a burst of
articles starting together costs one round trip, never an answer older than the article."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Asks persistence whether (job id, epoch) is still the job's lease.
LeaseCheck = Callable[[int, int], bool]


class LeaseLostError(Exception):
    """The job's lease passed to another orchestrator: nothing more is written under this one."""


class JobLease:
    """One job's lease epoch as a stream works under it. Thread-safe. Once found stale (by a
    check, or by a save persistence refused), it stays lost."""

    def __init__(self, job_id: int, epoch: int, check: LeaseCheck | None) -> None:
        self.job_id = job_id
        self.epoch = epoch
        self._check = check  # None: work outside any job, never checked
        self._cond = threading.Condition()
        self._lost = ""
        self._asked = 0  # tickets handed out: each held() call takes the next
        self._answered = 0  # the newest ticket a finished check covers
        self._checking = False

    @classmethod
    def unchecked(cls) -> JobLease:
        """A lease that is never checked (a call made outside any job)."""
        return cls(0, 0, None)

    @property
    def lost(self) -> str:
        """Why the lease is lost; "" while it is held."""
        with self._cond:
            return self._lost

    def lose(self, reason: str) -> None:
        """Persistence refused a write under this epoch: stop working under it."""
        with self._cond:
            if not self._lost:
                log.warning("job %d: lease epoch %d lost: %s", self.job_id, self.epoch, reason)
            self._lost = self._lost or reason
            self._cond.notify_all()

    def held(self) -> bool:
        """Whether the epoch is still the job's, by a check made after this call began (one
        check answers every caller that was waiting when it began). A check that cannot reach
        persistence counts as held: the saves are fenced all the same."""
        if self._check is None:
            return True
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while not self._lost and self._answered < ticket:
                if not self._checking:
                    self._checking = True
                    covers = self._asked  # every ticket handed out so far
                    break
                self._cond.wait()
            else:
                return not self._lost
        current = True
        try:
            current = self._check(self.job_id, self.epoch)
        except Exception as e:  # persistence away: the fenced saves still decide
            log.warning("job %d: could not check its lease (%s); going on", self.job_id, e)
        with self._cond:
            self._checking = False
            self._answered = max(self._answered, covers)
            if not current and not self._lost:
                self._lost = (
                    f"job {self.job_id}: another orchestrator holds the job now "
                    f"(lease epoch {self.epoch} is stale)"
                )
                log.warning("%s: writing nothing more under it", self._lost)
            self._cond.notify_all()
            return not self._lost
