"""Refused calls are logged once per client and kind a minute, with a count of the rest."""

from __future__ import annotations

import logging

import pytest

from tierwriter.refused_calls import RefusedCalls, peer_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_client_and_kind_a_minute_and_the_next_says_how_many_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    refused = RefusedCalls(logging.getLogger("test.refused"), clock)
    for _ in range(300):
        refused.note("10.0.0.9", "no credentials")
    refused.note("10.0.0.7", "no credentials")  # another client: a line of its own
    refused.note("10.0.0.9", "no valid service token", "GetJob")  # another kind: too
    clock.now += 60
    refused.note("10.0.0.9", "no credentials")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a call from 10.0.0.9: no credentials",
        "refused a call from 10.0.0.7: no credentials",
        "refused a call from 10.0.0.9: no valid service token: GetJob",
        "refused a call from 10.0.0.9: no credentials (299 more in the minute before)",
    ]


def test_many_clients_cannot_grow_it_without_bound() -> None:
    refused = RefusedCalls(logging.getLogger("test.refused"), Clock(), max_tracked=100)
    for n in range(10_000):
        refused.note(f"10.0.{n // 250}.{n % 250}", "no credentials")
    assert len(refused._windows) == 100


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.5:4711", "10.0.0.5"),
        ("ipv6:[::1]:4711", "::1"),
        ("ipv6:[2001:db8::7]:50051", "2001:db8::7"),
        ("unix:/run/tw.sock", "unix:/run/tw.sock"),
    ],
)
def test_the_peer_address_loses_its_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address
