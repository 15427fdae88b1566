"""The application graph, as config/serve.yaml builds it: Ingress -> FluxWorker and Scorer, and
the task consumers JobRunner (-> FluxWorker and Scorer) and WebhookSender."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.flux_worker import FluxWorker
from deployments.ingress import Ingress
from deployments.job_runner import JobRunner
from deployments.scorer import Scorer
from deployments.webhook_sender import WebhookSender
from serve_app.settings import get_settings


def build_app(args: dict[str, Any]) -> Application:
    """Bind the graph; settings come from the environment (the config's runtime_env.env_vars)."""
    if args:
        raise ValueError(
            f"unexpected application args {sorted(args)}: set FLUX_SERVE_* variables in the "
            "application's runtime_env.env_vars instead"
        )
    get_settings()  # fail the deploy early on invalid settings
    # mypy does not apply class decorators, so it can't see what @serve.deployment adds.
    worker = FluxWorker.bind()  # type: ignore[attr-defined]
    scorer = Scorer.bind()  # type: ignore[attr-defined]
    consumers = [JobRunner.bind(worker, scorer), WebhookSender.bind()]  # type: ignore[attr-defined]
    return Ingress.bind(worker, scorer, consumers)  # type: ignore[attr-defined]
