"""The scorer ranks images for their prompt with a real CLIP model."""

from __future__ import annotations

from serve_app.generation.pipeline import FluxGenerator
from serve_app.models.scoring import ClipScorer

from .test_generation import job


def test_scores_are_deterministic_and_tell_images_apart(
    generator: FluxGenerator, scorer: ClipScorer
) -> None:
    images = [r.data for r in generator.render([job(index=i, seed=i) for i in range(4)])]
    scores = scorer.score("a red cat", images)
    assert scores == scorer.score("a red cat", images)
    assert len(set(scores)) == 4
    assert all(-100.0 <= s <= 100.0 for s in scores)


def test_scores_depend_on_the_prompt(generator: FluxGenerator, scorer: ClipScorer) -> None:
    images = [r.data for r in generator.render([job()])]
    assert scorer.score("a red cat", images) != scorer.score("the blue sky over a city", images)


def test_no_images_no_scores(scorer: ClipScorer) -> None:
    assert scorer.score("a red cat", []) == []
