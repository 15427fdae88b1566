"""Health checks fail when a model can no longer run, so that Ray Serve restarts the replica."""

from __future__ import annotations

import pytest
import torch

from serve_app.generation.pipeline import FluxGenerator
from serve_app.models.scoring import ClipScorer
from serve_app.settings import ServiceSettings


@pytest.fixture
def own_settings(settings: ServiceSettings) -> ServiceSettings:
    return settings.model_copy(update={"warmup": False})


def corrupt(module: torch.nn.Module) -> None:
    """What a failing device or a bad weights file leaves behind: NaN in every weight."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))


def test_a_working_generator_passes(generator: FluxGenerator) -> None:
    generator.check()


def test_a_generator_whose_model_cannot_run_fails(own_settings: ServiceSettings) -> None:
    generator = FluxGenerator(own_settings)
    generator.check()
    corrupt(generator.pipeline.transformer)
    with pytest.raises(RuntimeError, match="non-finite"):
        generator.check()


def test_a_busy_generator_passes_without_waiting(own_settings: ServiceSettings) -> None:
    generator = FluxGenerator(own_settings)
    corrupt(generator.pipeline.transformer)
    with generator._lock:  # a batch in progress
        generator.check()


def test_a_scorer_whose_model_cannot_run_fails(own_settings: ServiceSettings) -> None:
    scorer = ClipScorer(own_settings)
    scorer.check()
    corrupt(scorer.model)
    with pytest.raises(RuntimeError, match="non-finite"):
        scorer.check()
