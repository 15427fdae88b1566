"""Server-sent events read line by line, by the rules of the HTML standard."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of a ``text/event-stream``."""

    event: str
    data: str


class EventStreamDecoder:
    """Builds server-sent events from the lines of a stream, by the rules of the HTML standard.

    ``id`` and ``retry`` fields are skipped: the API sends none, and this client does not reconnect.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def decode(self, line: str) -> ServerSentEvent | None:
        """Take one line (without its line break); an event when the line completes one."""
        if not line:
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            complete = bool(self._data)
            self._event, self._data = "", []
            return event if complete else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def read_events(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """The events of a stream given line by line."""
    decoder = EventStreamDecoder()
    for line in lines:
        if (event := decoder.decode(line)) is not None:
            yield event


async def aread_events(lines: AsyncIterable[str]) -> AsyncIterator[ServerSentEvent]:
    """The events of a stream given line by line, asynchronously."""
    decoder = EventStreamDecoder()
    async for line in lines:
        if (event := decoder.decode(line)) is not None:
            yield event
