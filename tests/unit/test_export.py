"""Writing an export: only paths inside the folder, only files whose checksum matches, and
nothing half-written left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from orchestrator_service.export import (
    ExportError,
    destination,
    file_chunks,
    write_files,
)
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".",
        "./",
        "site/./x.html",
        "a\0b",
        "/etc/passwd",
        "../outside.html",
        "site/../../outside.html",
        "site\\..\\x",
    ],
)
def test_a_path_that_leaves_the_folder_is_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(ExportError, match="refused a file path"):
        destination(tmp_path, path)


def test_chunks_round_trip_byte_for_byte(tmp_path: Path) -> None:
    big = bytes(range(256)) * 5000  # 1.28 MB: several chunks
    files = [
        ("index.html", b"<p>index</p>"),
        ("blog.example.net/page.html", big),
        ("empty.txt", b""),
    ]
    out = tmp_path / "client"
    written = write_files(file_chunks(files), out)
    assert sorted(f.path.relative_to(out).as_posix() for f in written) == [
        "blog.example.net/page.html",
        "empty.txt",
        "index.html",
    ]
    assert (out / "blog.example.net" / "page.html").read_bytes() == big
    assert (out / "empty.txt").read_bytes() == b""
    assert all((f.path.stat().st_mode & 0o777) == 0o644 for f in written)  # ready to publish
    assert [f.size for f in written if f.path.name == "page.html"] == [len(big)]
    assert sorted(p.name for p in out.rglob(".*")) == []  # no temporary file left


def test_a_checksum_that_does_not_match_leaves_no_file(tmp_path: Path) -> None:
    messages = [
        pb.ExportJobResponse(path="a.html", size=3, data=b"abc", sha256="0" * 64),
    ]
    with pytest.raises(ExportError, match="checksum does not match"):
        write_files(messages, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_stream_that_ends_inside_a_file_leaves_no_file(tmp_path: Path) -> None:
    good = hashlib.sha256(b"abc").hexdigest()
    messages = [
        pb.ExportJobResponse(path="done.html", size=3, data=b"abc", sha256=good),
        pb.ExportJobResponse(path="cut.html", size=6, data=b"abc"),
    ]
    with pytest.raises(ExportError, match="the stream ended inside it"):
        write_files(messages, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["done.html"]
