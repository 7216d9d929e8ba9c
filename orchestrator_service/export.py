"""A job's files over the API: any orchestrator streams what post-processing published (pages,
site indexes, title lists, the job's index) from the database as chunks, and the client writes
them under a folder of its own, each file checked against its SHA-256. The database rather than
an orchestrator's disk: on a cluster the replica asked is seldom the one that published.

The client guards the paths: it writes only relative paths that stay inside its folder, so a
hostile server cannot reach a file elsewhere."""

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


def file_chunks(files: Iterable[tuple[str, bytes]]) -> Iterator[pb.ExportJobResponse]:
    """Files, (relative path, bytes), as ExportJob messages: each in chunks, its path and size
    on the first, its SHA-256 on the last."""
    for path, content in files:
        digest = hashlib.sha256(content).hexdigest()
        chunks = [content[i : i + CHUNK_BYTES] for i in range(0, len(content), CHUNK_BYTES)]
        for n, data in enumerate(chunks or [b""]):
            message = pb.ExportJobResponse(data=data)
            if n == 0:
                message.path, message.size = path, len(content)
            if n == max(0, len(chunks) - 1):
                message.sha256 = digest
            yield message


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
