"""Scorer: ranks images for their prompt on a CLIP-architecture model."""

from __future__ import annotations

import asyncio

from ray import serve

from serve_app.models.scoring import ClipScorer
from serve_app.settings import get_settings


@serve.deployment(ray_actor_options={"num_cpus": 0.25, "num_gpus": 0}, max_ongoing_requests=8)
class Scorer:
    """Scores encoded images for a prompt."""

    def __init__(self) -> None:
        self.scorer = ClipScorer(get_settings())

    async def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises: the model can no longer run."""
        await asyncio.to_thread(self.scorer.check)

    async def score(self, prompt: str, images: list[bytes]) -> list[float]:
        """One score per image, in order."""
        return await asyncio.to_thread(self.scorer.score, prompt, images)
