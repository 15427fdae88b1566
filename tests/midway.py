"""A request that loses part of the cluster in the middle: streamed, with something killed as
soon as its first image is out, and then checked for every image, each stored once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx

from serve_app.client.events import read_events

# Two shards of eight jobs, two batches each: when the first image is out, both workers still
# have a batch to make.
PAYLOAD = {
    "prompt": "a red cat",
    "nof_images": 16,
    "gpus": 2,
    "stream": True,
    "diversity": {"nof_steps": [12]},
}


def loses_no_image_when(
    kill: Callable[[], object], url: str, storage: Path, timeout_s: float
) -> None:
    """Stream PAYLOAD from ``url``, call ``kill`` at the first image, and check the answer has
    all 16 images and that ``storage`` holds each once, retries included."""
    killed = False
    events = []
    with httpx.stream("POST", f"{url}/generate", json=PAYLOAD, timeout=timeout_s) as response:
        assert response.status_code == 200
        for event in read_events(response.iter_lines()):
            events.append((event.event, json.loads(event.data)))
            if not killed:
                kill()
                killed = True
    assert killed
    assert events[-1][0] == "result", events[-1]
    result = events[-1][1]
    assert sorted(image["index"] for image in result["images"]) == list(range(16))
    assert len(list((storage / result["request_id"]).iterdir())) == 16
