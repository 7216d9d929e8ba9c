"""The image's entrypoint: `python -m tierwriter.container SERVICE [ARGS]` runs `python -m SERVICE`
as the unprivileged `tierwriter` user, after doing as root what a fresh compose set-up needs:

- a bind-mounted folder the engine created (root-owned ./output, ./data) becomes the service
  user's, so the first job can write its pages;
- TLS files mounted from the host (a key `openssl` wrote 0600 for the host user) are copied to a
  private folder the service user owns, and TLS_CERT_FILE / TLS_KEY_FILE / TIERWRITER_CA_FILE
  point at the copies.

Started as any other user (`docker run --user`), it changes nothing and runs the service."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

SERVICE_USER = "tierwriter"
WRITABLE = (Path("/app/output"), Path("/app/data"))
TLS_SETTINGS = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TIERWRITER_CA_FILE")
PRIVATE_TLS_DIR = Path("/run/tierwriter/tls")


def own_folders(folders: tuple[Path, ...], uid: int, gid: int) -> None:
    """Give each existing folder (not its files) to uid:gid, so the service can write into it."""
    for folder in folders:
        if folder.is_dir() and folder.stat().st_uid != uid:
            os.chown(folder, uid, gid)


def private_tls_copies(
    environ: Mapping[str, str], target: Path, uid: int, gid: int
) -> dict[str, str]:
    """Copies of the TLS files the settings name, readable by uid only; the settings' new
    values. A missing file is left for the service to report by its setting's name."""
    updates: dict[str, str] = {}
    for setting in TLS_SETTINGS:
        source = Path(environ.get(setting) or "")
        if not environ.get(setting) or not source.is_file():
            continue
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(target, uid, gid)
        copy = target / f"{setting.lower()}.pem"
        shutil.copyfile(source, copy)
        os.chmod(copy, 0o600)
        os.chown(copy, uid, gid)
        updates[setting] = str(copy)
    return updates


def main(argv: list[str]) -> None:
    """Prepare as root, drop to the service user, exec the service."""
    if len(argv) < 2:
        sys.exit("usage: python -m tierwriter.container SERVICE [ARGS...]")
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVICE_USER)
        own_folders(WRITABLE, user.pw_uid, user.pw_gid)
        os.environ.update(
            private_tls_copies(os.environ, PRIVATE_TLS_DIR, user.pw_uid, user.pw_gid)
        )
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        os.environ["HOME"] = user.pw_dir
    os.execvp(sys.executable, [sys.executable, "-m", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv)
