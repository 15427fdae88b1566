"""Ranks images for a prompt by CLIP score with any CLIP-architecture model (CLIP, PickScore)."""

from __future__ import annotations

import io
import logging
import math
import threading

import torch
from PIL import Image

from serve_app.models.sources import (
    quiet_progress_bars,
    resolve_source,
    select_device,
    select_dtype,
)
from serve_app.models.tiny import TINY_CLIP_NAME
from serve_app.settings import ServiceSettings

logger = logging.getLogger(__name__)


class ClipScorer:
    """Scores images as 100 x the cosine similarity of their CLIP embeddings with the prompt's."""

    def __init__(self, settings: ServiceSettings) -> None:
        from transformers import CLIPModel, CLIPProcessor

        quiet_progress_bars()
        self.device = select_device(settings)
        self.dtype = select_dtype(settings, self.device)
        source = resolve_source(settings.scorer_model, TINY_CLIP_NAME, settings.cache_dir)
        processor_source = settings.scorer_processor or source
        logger.info("loading scorer from %s on %s", source, self.device)
        self.model = CLIPModel.from_pretrained(source, dtype=self.dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_source)
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise RuntimeError unless the model still scores an image with a finite number."""
        blank = io.BytesIO()
        Image.new("RGB", (64, 64)).save(blank, format="PNG")
        (score,) = self.score("health check", [blank.getvalue()])
        if not math.isfinite(score):
            raise RuntimeError(f"the scorer on {self.device} produces non-finite scores")

    def score(self, prompt: str, images: list[bytes]) -> list[float]:
        """One score per encoded image, in order; higher matches the prompt better."""
        if not images:
            return []
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = self.processor(
            text=[prompt], images=pictures, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with self._lock, torch.inference_mode():
            # CLIPModel's forward returns both embeddings already L2-normalized.
            outputs = self.model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"].to(self.dtype),
            )
        similarity = outputs.image_embeds.float() @ outputs.text_embeds[0].float()
        return (100.0 * similarity).tolist()  # type: ignore[no-any-return]
