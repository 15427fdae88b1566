"""Prompt embeddings: each distinct text through the text encoders once, reused batch after batch.

FLUX conditions on two text encoders, CLIP-L (a pooled vector) and T5-XXL (a token sequence; 4.7 B
parameters in FLUX.1). Handed prompt strings, a FluxPipeline encodes every image's prompt, so a
16-image request ran T5 16 times for one text. Here a batch encodes only the texts it has not seen
recently, each once, and hands the pipeline ``prompt_embeds`` and ``pooled_prompt_embeds``: the
pipelines that share these encoders (FluxImg2ImgPipeline and FluxInpaintPipeline made with
``from_pipe``) take the same arguments.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PromptEmbedding:
    """What the text encoders make of one text, each with a batch dimension of one."""

    sequence: torch.Tensor
    """T5's token embeddings, ``[1, max_sequence_length, joint_attention_dim]``."""
    pooled: torch.Tensor
    """CLIP's pooled embedding, ``[1, pooled_projection_dim]``."""


EmbeddingKey = tuple[str, int]
"""The exact text and the T5 length it was padded or cut to: together they fix its embedding."""


class PromptCache:
    """The embeddings of the most recently used texts, at most ``capacity`` of them (LRU).

    Not thread-safe: its owner uses it under the lock that guards its pipeline.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[EmbeddingKey, PromptEmbedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: EmbeddingKey) -> PromptEmbedding | None:
        """The embedding stored under ``key``, now the most recently used; None if absent."""
        embedding = self._entries.get(key)
        if embedding is not None:
            self._entries.move_to_end(key)
        return embedding

    def put(self, key: EmbeddingKey, embedding: PromptEmbedding) -> None:
        """Store ``embedding``, forgetting the least recently used one beyond the capacity."""
        if self.capacity == 0:
            return
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def encode_texts(
    pipeline: Any, texts: list[str], max_sequence_length: int
) -> list[PromptEmbedding]:
    """One pass of ``pipeline``'s text encoders over ``texts``: their embeddings, in order."""
    with torch.inference_mode():
        sequences, pooled, _ = pipeline.encode_prompt(
            prompt=texts, prompt_2=None, max_sequence_length=max_sequence_length
        )
    # Copies, so that a cached row does not keep the whole batch's tensor alive.
    return [
        PromptEmbedding(
            sequence=sequences[row : row + 1].clone(), pooled=pooled[row : row + 1].clone()
        )
        for row in range(len(texts))
    ]


class PromptEncoder:
    """Encodes the prompts of batches on one pipeline: a text already in the cache is not
    encoded again, and the texts a batch is missing are encoded together, each once."""

    def __init__(self, pipeline: Any, cache_size: int) -> None:
        self.pipeline = pipeline
        self.cache = PromptCache(cache_size)

    def embeddings(self, texts: list[str], max_sequence_length: int) -> list[PromptEmbedding]:
        """The embedding of each of ``texts``, in order."""
        found = {
            text: embedding
            for text in dict.fromkeys(texts)
            if (embedding := self.cache.get((text, max_sequence_length))) is not None
        }
        missing = [text for text in dict.fromkeys(texts) if text not in found]
        if missing:
            for text, embedding in zip(
                missing, encode_texts(self.pipeline, missing, max_sequence_length), strict=True
            ):
                self.cache.put((text, max_sequence_length), embedding)
                found[text] = embedding
        return [found[text] for text in texts]

    def arguments(
        self, prompts: list[str], negative_prompts: list[str] | None, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        """The embedding arguments of a FluxPipeline call that takes one image per prompt:
        ``prompt_embeds`` and ``pooled_prompt_embeds``; with ``negative_prompts`` (true
        classifier-free guidance) also ``negative_prompt_embeds`` and
        ``negative_pooled_prompt_embeds``."""
        texts = prompts + (negative_prompts or [])
        embeddings = self.embeddings(texts, max_sequence_length)
        positive, negative = embeddings[: len(prompts)], embeddings[len(prompts) :]
        arguments = _batched(positive, "")
        if negative_prompts is not None:
            arguments.update(_batched(negative, "negative_"))
        return arguments


def _batched(embeddings: list[PromptEmbedding], prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}prompt_embeds": torch.cat([embedding.sequence for embedding in embeddings]),
        f"{prefix}pooled_prompt_embeds": torch.cat([embedding.pooled for embedding in embeddings]),
    }
