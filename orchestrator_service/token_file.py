"""Where `tierwriter login` keeps its session token: a JSON file only its owner can read
(TIERWRITER_TOKEN_FILE, else $XDG_CONFIG_HOME/tierwriter/token.json, else
~/.config/tierwriter/token.json)."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


class TokenFileError(Exception):
    """The saved session cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class SavedSession:
    """A token from Login and what it is for."""

    address: str
    username: str
    token: str
    expires_at: float


def default_path() -> Path:
    """The token file's path from the environment."""
    explicit = os.environ.get("TIERWRITER_TOKEN_FILE")
    if explicit:
        return Path(explicit)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "tierwriter" / "token.json"


def save(session: SavedSession, path: Path) -> None:
    """Write the session so that only the current user can read it (0600, in a 0700 folder
    when we create it), replacing any earlier one atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp creates the file 0600 before anything is written: the token is never readable
    # by others, not even for a moment.
    fd, temporary = tempfile.mkstemp(prefix=".token-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(session), f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read(path: Path) -> SavedSession | None:
    """The saved session, whatever its address, age or file mode (for logout, which revokes it
    even then); None when there is no file. TokenFileError when it cannot be read."""
    try:
        return SavedSession(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise TokenFileError(f"{path} is not a tierwriter token file ({e}): run login") from e


def load(path: Path, address: str) -> SavedSession | None:
    """The saved session for `address`; None when there is no file. TokenFileError when the
    file is readable by others, unreadable, for another address, or expired."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{path} can be read by other users, so its token is not used: delete it and run "
            "`tierwriter login` again"
        )
    session = read(path)
    if session is None:
        return None
    if session.address != address:
        raise TokenFileError(
            f"not logged in to {address} (the saved session is for {session.address}): run "
            "`tierwriter login`"
        )
    if session.expires_at <= time.time():
        raise TokenFileError(f"your session on {address} has expired: run `tierwriter login`")
    return session


def delete(path: Path) -> bool:
    """Remove the token file; whether there was one."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
