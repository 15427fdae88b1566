"""Image inputs on the real Ray Serve instance: through the proxy, the ingress and the workers."""

from __future__ import annotations

import hashlib

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import ServeCluster
from .images import data_url, encode, mean_abs_difference

pytestmark = pytest.mark.ray

# Noise compresses badly: a PNG of about a megabyte, far above the old 64 KiB body limit.
NOISE = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 600, 3), np.uint8)))


def test_an_image_to_image_request_over_the_cluster_reproduces_its_pixels(
    serve_cluster: ServeCluster,
) -> None:
    assert len(NOISE) > 2**20
    payload = {
        "prompt": "a red cat",
        "image": data_url(NOISE),
        "strength": 0.5,
        "width": 64,
        "height": 64,
        "nof_images": 4,
        "gpus": 2,  # two render calls, on two workers, each carrying the input once
    }
    made = []
    for _ in range(2):
        response = httpx.post(f"{serve_cluster.url}/generate", json=payload, timeout=120)
        assert response.status_code == 200, response.text
        made.append(response.json()["images"])
    digest = "sha256:" + hashlib.sha256(NOISE).hexdigest()
    for first, again in zip(*made, strict=True):
        assert first["sampling_params"] == again["sampling_params"]
        assert first["sampling_params"]["image_digest"] == digest
        # Batches may be put together otherwise the second time: equal within rounding.
        assert (
            mean_abs_difference(
                httpx.get(first["url"], timeout=30).content,
                httpx.get(again["url"], timeout=30).content,
            )
            <= 1.0
        )


def test_a_bad_input_over_the_cluster_is_a_422_naming_it(serve_cluster: ServeCluster) -> None:
    payload = {"prompt": "a red cat", "image": data_url(b"GIF89a not really"), "stream": True}
    response = httpx.post(f"{serve_cluster.url}/generate", json=payload, timeout=60)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "image"
