"""Reads server-sent events in tests."""

from __future__ import annotations

import json
from collections.abc import Iterable


def parse_events(lines: Iterable[str]) -> list[tuple[str, dict[str, object]]]:
    """(event, data) pairs of an SSE stream given line by line."""
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name is not None:
            events.append((name, json.loads(line.removeprefix("data: "))))
            name = None
    return events
