"""Reads server-sent events in tests, with the client's parser."""

from __future__ import annotations

import json
from collections.abc import Iterable

from serve_app.client.events import read_events


def parse_events(lines: Iterable[str]) -> list[tuple[str, dict[str, object]]]:
    """(event, data) pairs of an SSE stream given line by line."""
    return [(event.event, json.loads(event.data)) for event in read_events(lines)]
