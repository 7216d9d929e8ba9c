"""Where a run of a job writes its files, and how they become the job's folder.

`OUTPUT_DIR/<job id>` is a symbolic link to the folder of the run that published the job last,
`OUTPUT_DIR/.runs/<job id>/<epoch>/`, named by the lease epoch the run held. A run writes only
into its own folder; linking it is a compare-and-swap under a lock file: the link never goes
back to an older epoch's folder. So an orchestrator that was paused past its lease and wakes up
may write into its own folder before it learns that another holds the job, but its files are
never the ones shown, and the newer run's are never overwritten. The link is relative, so the
folder reads the same through a container's bind mount."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from orchestrator_service import export

log = logging.getLogger(__name__)

RUNS = ".runs"


def run_dir(output_root: Path, job_id: int, epoch: int) -> Path:
    """output/.runs/<job id>/<epoch>: the folder one run writes into."""
    return output_root / RUNS / str(job_id) / str(epoch)


def linked_epoch(output_root: Path, job_id: int) -> int | None:
    """The epoch of the run whose folder output/<job id> shows; None when it shows none (or an
    old-style folder of its own)."""
    link = output_root / str(job_id)
    try:
        target = os.readlink(link)
    except OSError:
        return None
    name = Path(target).name
    return int(name) if name.isdigit() else None


@contextlib.contextmanager
def _locked(output_root: Path, job_id: int) -> Iterator[None]:
    """One linker of a job at a time on this machine (orchestrators sharing OUTPUT_DIR)."""
    folder = output_root / RUNS / str(job_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / ".lock").open("a")
    except OSError as e:
        raise OutputWriteError(folder / ".lock", e) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def link_run(output_root: Path, job_id: int, epoch: int) -> bool:
    """Make output/<job id> show the folder of the run under `epoch`, unless a run of a newer
    epoch shows already; True when it shows ours. The folders of older runs are removed."""
    link = output_root / str(job_id)
    with _locked(output_root, job_id):
        shown = linked_epoch(output_root, job_id)
        if shown is not None and shown > epoch:
            log.warning(
                "job %d: the files of run %d are not shown: run %d published since",
                job_id, epoch, shown,
            )  # fmt: skip
            return False
        try:
            if link.is_dir() and not link.is_symlink():  # written before runs had folders
                link.rename(run_dir(output_root, job_id, 0))
            temporary = link.with_name(f".{job_id}.link-{epoch}")
            temporary.unlink(missing_ok=True)
            os.symlink(Path(RUNS) / str(job_id) / str(epoch), temporary)
            os.replace(temporary, link)  # atomic: the job's folder is always one run's
        except OSError as e:
            raise OutputWriteError(link, e) from e
    for older in (output_root / RUNS / str(job_id)).iterdir():
        if older.name.isdigit() and int(older.name) < epoch:
            shutil.rmtree(older, ignore_errors=True)
    return True


def discard_run(output_root: Path, job_id: int, epoch: int) -> None:
    """Remove a run's folder that will never be shown (its lease was lost)."""
    if linked_epoch(output_root, job_id) != epoch:
        shutil.rmtree(run_dir(output_root, job_id, epoch), ignore_errors=True)


class OutputWriteError(Exception):
    """A file under OUTPUT_DIR could not be written; the message names the file and the cause
    in words a user acts on (the disk is full, permission denied, …)."""

    def __init__(self, path: Path, cause: OSError) -> None:
        self.path = path
        self.cause = _cause_of(cause)
        super().__init__(f"cannot write {path}: {self.cause}")

    def seen_from(self, root: Path, shown_root: Path) -> str:
        """The message with the path where the user finds it: under `shown_root`
        (PUBLIC_OUTPUT_DIR, e.g. the host folder a container's OUTPUT_DIR is mounted from), and
        in the job's folder rather than the run's (.runs/<job>/<epoch>/…), which it shows."""
        try:
            parts = self.path.relative_to(root).parts
        except ValueError:
            return f"cannot write {self.path}: {self.cause}"
        if len(parts) > 3 and parts[0] == RUNS and parts[2].isdigit():
            parts = (parts[1], *parts[3:])
        return f"cannot write {shown_root.joinpath(*parts)}: {self.cause}"


# What a user does about each: free space, fix the owner/mode, remount; the rest in the OS's words.
_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def _cause_of(error: OSError) -> str:
    reason = error.strerror or type(error).__name__
    cause = _CAUSES.get(error.errno or 0)
    return f"{cause} ({reason})" if cause else reason


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written page is ever seen.
    OutputWriteError, naming `path`, when the disk or its permissions refuse."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputWriteError(path, e) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, export.PAGE_MODE)  # mkstemp makes it its owner's only
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputWriteError(path, e) from e
        raise
