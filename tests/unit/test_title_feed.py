"""TitleFeed: titles handed to waiting articles as they come, and a stop that ends the call."""

from __future__ import annotations

import threading
from collections.abc import Callable

from orchestrator_service.title_feed import TitleFeed, TitlesStoppedError
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb


def test_a_waiting_article_gets_its_title_as_soon_as_it_comes() -> None:
    second_batch = threading.Event()

    def call(on_titles: Callable[[list[str]], None]) -> gen_pb.GenerateTitlesResponse:
        on_titles(["a", "b"])
        second_batch.wait(10)
        on_titles(["c"])
        return gen_pb.GenerateTitlesResponse(api_calls=2)

    feed = TitleFeed(["stored"])
    feed.start(call)
    assert feed.wait_for(2, lambda: False) == "b"  # while the second batch is held
    second_batch.set()
    assert feed.wait_for(3, lambda: False) == "c"
    assert feed.wait_for(4, lambda: False) is None  # the titles ended without it
    feed.wait()
    assert feed.titles() == ["stored", "a", "b", "c"] and feed.result is not None


def test_a_stop_gives_the_call_up_at_its_next_titles() -> None:
    stopped_now = threading.Event()

    def call(on_titles: Callable[[list[str]], None]) -> gen_pb.GenerateTitlesResponse:
        on_titles(["a"])
        stopped_now.wait(10)
        on_titles(["b"])  # raises: the stream is then cancelled
        return gen_pb.GenerateTitlesResponse()

    feed = TitleFeed([])
    feed.start(call)
    assert feed.wait_for(0, lambda: False) == "a"
    feed.stop()
    stopped_now.set()
    feed.wait()
    assert isinstance(feed.error, TitlesStoppedError) and feed.titles() == ["a"]
    assert feed.wait_for(1, lambda: True) is None
