"""TitleFeed: a tier's titles as they stream in from the generator, for its articles to start on."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tierwriter.generator.v1 import generator_service_pb2 as gen_pb

# How often a wait for the next title checks whether the tier was stopped.
STOP_POLL_SECONDS = 0.2

TitlesCall = Callable[[Callable[[list[str]], None]], gen_pb.GenerateTitlesResponse]


class TitlesStoppedError(Exception):
    """The tier stopped: its titles call was given up."""


class TitleFeed:
    """The titles of one tier: those it had (a resumed tier's), then those a titles call adds as
    its replies come. One thread runs the call; any thread may wait for a title. Thread-safe."""

    def __init__(self, titles: list[str]) -> None:
        self._titles = list(titles)
        self._changed = threading.Condition()
        self._done = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.result: gen_pb.GenerateTitlesResponse | None = None  # the call's totals, once done
        self.error: Exception | None = None  # why the call failed, if it did

    def start(self, call: TitlesCall) -> None:
        """Run `call(on_titles)` on a thread of its own; the feed is done when it returns."""
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(call,), name="titles", daemon=True)
        self._thread.start()

    def _run(self, call: TitlesCall) -> None:
        try:
            self.result = call(self._add)
        except Exception as e:  # the caller reads it once the feed is done
            self.error = e
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def _add(self, titles: list[str]) -> None:
        with self._changed:
            if self._stopping:  # raised into the call, which then cancels its stream
                raise TitlesStoppedError("the tier stopped before its titles were all in")
            self._titles.extend(titles)
            self._changed.notify_all()

    def stop(self) -> None:
        """Give the titles call up: it ends when its next titles come (the generator then
        starts no further round of calls). A no-op once it is done."""
        with self._changed:
            self._stopping = not self._done

    @property
    def done(self) -> bool:
        with self._changed:
            return self._done

    def wait_for(self, index: int, stopped: Callable[[], bool]) -> str | None:
        """Title `index` once it has come; None when the titles ended without it or `stopped()`
        turned true while waiting."""
        with self._changed:
            while len(self._titles) <= index and not self._done:
                if stopped():
                    return None
                self._changed.wait(STOP_POLL_SECONDS)
            return self._titles[index] if index < len(self._titles) else None

    def wait(self) -> None:
        """Until the titles call has ended."""
        if self._thread is not None:
            self._thread.join()

    def titles(self) -> list[str]:
        """Every title so far, in order."""
        with self._changed:
            return list(self._titles)
