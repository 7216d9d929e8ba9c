"""Credentials in call metadata, as clients send them: `authorization: Basic …` with a username
and password, or `Bearer <token>` with a session token from Login. Kept apart from auth.py
(which checks them) so that a client imports nothing of the server's."""

from __future__ import annotations

import base64

METADATA_KEY = "authorization"


def basic_credentials(username: str, password: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a username and password."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return ((METADATA_KEY, f"Basic {token}"),)


def bearer_credentials(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a session token from Login."""
    return ((METADATA_KEY, f"Bearer {token}"),)
