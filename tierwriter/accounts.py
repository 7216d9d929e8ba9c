"""The rules every account follows, shared by persistence (which stores accounts) and the
orchestrator (which refuses impossible credentials before spending a lookup or a hash on them)."""

from __future__ import annotations

import re

ROLES = ("admin", "user")
# Usernames appear in logs and messages: a plain, printable alphabet.
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Argon2 hashes any length, but a megabyte password per login would be a cheap way to burn CPU.
PASSWORD_MIN, PASSWORD_MAX = 8, 1024


def username_problem(username: str) -> str | None:
    """Why `username` cannot be one (naming the field), or None."""
    if USERNAME_PATTERN.fullmatch(username):
        return None
    return (
        "username: 1-64 characters of letters, digits, '.', '_', '@' or '-', starting with a "
        "letter or digit"
    )


def password_problem(password: str) -> str | None:
    """Why `password` cannot be one (naming the field, never repeating it), or None."""
    if PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return None
    return f"password: must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long"


def could_be_credentials(username: str, password: str) -> bool:
    """Whether a login with these could possibly succeed (both within the rules)."""
    return username_problem(username) is None and password_problem(password) is None
