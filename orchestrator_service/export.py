"""A job's files over the API: the orchestrator streams what post-processing wrote under
OUTPUT_DIR/<job id>/ (pages, site indexes, title lists, the job's index) as chunks, and the
client writes them under a folder of its own, each file checked against its SHA-256.

Both sides guard the paths: the server sends only regular files that really lie inside the
job's folder (no symlink out of it), and the client writes only relative paths that stay inside
its folder, so neither a stray link nor a hostile server can reach a file elsewhere."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

CHUNK_BYTES = 256 * 1024
PAGE_MODE = 0o644  # pages are for publishing: anyone may read them


class ExportError(Exception):
    """The export cannot be written: a bad path from the server, a checksum that does not
    match, or a stream that ended inside a file."""


def job_files(job_dir: Path) -> list[Path]:
    """The regular files inside `job_dir`, in path order; anything that is a symlink, resolves
    outside the folder or is hidden (a half-written `.page.html.tmp`) is left out."""
    root = job_dir.resolve()
    files = []
    for folder, dirs, names in os.walk(root):  # os.walk does not follow symlinked folders
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if not path.resolve().is_relative_to(root):
                continue
            files.append(path)
    return files


def file_chunks(job_dir: Path, files: Iterable[Path]) -> Iterator[pb.ExportJobResponse]:
    """`files` (job_files of the job's folder) as ExportJob messages."""
    root = job_dir.resolve()
    for path in files:
        digest = hashlib.sha256()
        relative = path.relative_to(root).as_posix()
        with path.open("rb") as f:
            first = True
            data = f.read(CHUNK_BYTES)
            while True:
                digest.update(data)
                following = f.read(CHUNK_BYTES) if data else b""
                message = pb.ExportJobResponse(data=data)
                if first:
                    message.path, message.size = relative, os.fstat(f.fileno()).st_size
                    first = False
                if not following:
                    message.sha256 = digest.hexdigest()
                    yield message
                    break
                yield message
                data = following


def destination(root: Path, path: str) -> Path:
    """Where a file the server names goes under `root`; ExportError for a path that is empty,
    absolute, or climbs out of it."""
    relative = PurePosixPath(path)
    refused = (
        not path
        or "\0" in path
        or "\\" in path
        or relative.is_absolute()
        or any(part in (".", "..") for part in path.split("/"))
    )
    target = root.resolve() if refused else (root / Path(*relative.parts)).resolve()
    if refused or target == root.resolve() or not target.is_relative_to(root.resolve()):
        raise ExportError(f"refused a file path from the server: {path!r}")
    return target


@dataclass(frozen=True)
class WrittenFile:
    """One file the export wrote."""

    path: Path
    size: int


def write_files(messages: Iterable[pb.ExportJobResponse], root: Path) -> list[WrittenFile]:
    """Write the streamed files under `root`, each to a temporary file first and renamed into
    place once its checksum matches; the files written, in order."""
    written: list[WrittenFile] = []
    current: tuple[Path, hashlib._Hash, tempfile._TemporaryFileWrapper[bytes]] | None = None
    try:
        for message in messages:
            if message.path:
                if current is not None:
                    raise ExportError(f"{current[0]}: the next file began before it ended")
                target = destination(root, message.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                temp = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed when the file ends)
                    dir=target.parent, prefix=f".{target.name}.", delete=False
                )
                current = (target, hashlib.sha256(), temp)
            if current is None:
                raise ExportError("the server sent data before naming its file")
            target, digest, temp = current
            temp.write(message.data)
            digest.update(message.data)
            if message.sha256:
                temp.close()
                if digest.hexdigest() != message.sha256:
                    raise ExportError(f"{target}: its checksum does not match; try again")
                os.chmod(temp.name, PAGE_MODE)  # a temporary file is its owner's only
                os.replace(temp.name, target)
                written.append(WrittenFile(target, target.stat().st_size))
                current = None
        if current is not None:
            raise ExportError(f"{current[0]}: the stream ended inside it")
    finally:
        if current is not None:  # an unfinished file leaves no trace
            current[2].close()
            Path(current[2].name).unlink(missing_ok=True)
    return written
