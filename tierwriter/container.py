"""The image's entrypoint: `python -m tierwriter.container SERVICE [ARGS]` runs `python -m SERVICE`
as an unprivileged user, after doing as root what a fresh compose set-up needs:

- the service runs as the owner of the bind-mounted /app/output when the user made that folder
  (`mkdir output`: the pages are then the user's), else as `tierwriter`, and a folder the engine
  created for the mount (root's) is given to `tierwriter`, so the first job can write;
- TLS files mounted from the host (a key `openssl` wrote 0600 for the host user) are copied to a
  folder root owns and the service's group may read, made anew at every start, and
  TLS_CERT_FILE / TLS_KEY_FILE / TIERWRITER_CA_FILE point at the copies.

Started as any other user (`docker run --user`), it changes nothing and runs the service."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

SERVICE_USER = "tierwriter"
OUTPUT = Path("/app/output")
WRITABLE = (OUTPUT, Path("/app/data"))
TLS_SETTINGS = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TIERWRITER_CA_FILE")
PRIVATE_TLS_DIR = Path("/run/tierwriter-tls")


def service_identity(output: Path, default: tuple[int, int]) -> tuple[int, int]:
    """(uid, gid) to run as: the owner of a user-made output folder, else `default`."""
    if output.is_dir():
        owner = output.stat()
        if owner.st_uid != 0:
            return owner.st_uid, owner.st_gid
    return default


def own_folders(folders: tuple[Path, ...], uid: int, gid: int) -> None:
    """Give each existing root-owned folder (not its files) to uid:gid, so the service can write
    into it; a folder someone else owns is left as it is."""
    for folder in folders:
        if folder.is_dir() and folder.stat().st_uid == 0 and uid != 0:
            os.chown(folder, uid, gid)


def private_tls_copies(
    environ: Mapping[str, str], target: Path, gid: int, owner: int = 0
) -> dict[str, str]:
    """Copies of the TLS files the settings name, in `target` made anew (owner `owner`, mode
    0750, group `gid`; files 0640), so the service's group reads them and nothing the service
    could have left there is followed. The settings' new values; a missing file is left for
    the service to report by its setting's name."""
    wanted = [s for s in TLS_SETTINGS if environ.get(s) and Path(environ[s]).is_file()]
    if not wanted:
        return {}
    if target.is_symlink() or target.exists():
        if target.is_symlink() or not target.is_dir():
            target.unlink()
        else:
            shutil.rmtree(target)
    target.mkdir(mode=0o750)
    os.chown(target, owner, gid)
    os.chmod(target, 0o750)
    updates: dict[str, str] = {}
    for setting in wanted:
        copy = target / f"{setting.lower()}.pem"
        data = Path(environ[setting]).read_bytes()
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        try:
            os.fchown(fd, owner, gid)
            os.fchmod(fd, 0o640)
            os.write(fd, data)
        finally:
            os.close(fd)
        updates[setting] = str(copy)
    return updates


def main(argv: list[str]) -> None:
    """Prepare as root, drop to the service's user, exec the service."""
    if len(argv) < 2:
        sys.exit("usage: python -m tierwriter.container SERVICE [ARGS...]")
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVICE_USER)
        uid, gid = service_identity(OUTPUT, (account.pw_uid, account.pw_gid))
        own_folders(WRITABLE, uid, gid)
        os.environ.update(private_tls_copies(os.environ, PRIVATE_TLS_DIR, gid))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os.environ["HOME"] = "/app"
    os.execvp(sys.executable, [sys.executable, "-m", *argv[1:]])


if __name__ == "__main__":
    main(sys.argv)
