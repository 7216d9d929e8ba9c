"""Credentials on orchestrator calls: `authorization: Basic base64(username:password)` metadata."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

METADATA_KEY = "authorization"


def basic_credentials(username: str, password: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the credentials."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return ((METADATA_KEY, f"Basic {token}"),)


def credentials_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]],
) -> tuple[str, str] | None:
    """(username, password) from call metadata, or None when absent or malformed."""
    for key, value in metadata:
        if key != METADATA_KEY or not isinstance(value, str) or not value.startswith("Basic "):
            continue
        try:
            decoded = base64.b64decode(value[len("Basic ") :], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        return (username, password) if sep and username else None
    return None
