"""What the service reports about itself; the deployments export it to Prometheus through Ray.

Plain Python so that the request flow can report without knowing about Ray.
"""

from __future__ import annotations

from typing import Literal, Protocol

Stage = Literal["generation", "scoring", "upload"]
Outcome = Literal["success", "client_error", "server_error"]
JobOutcome = Literal["succeeded", "failed", "cancelled"]
DeliveryOutcome = Literal["delivered", "retrying", "failed", "refused"]
AdapterOutcome = Literal["hit", "miss", "evicted"]


def outcome_of(status_code: int) -> Outcome:
    """The outcome label of an HTTP status code."""
    if status_code < 400:
        return "success"
    if status_code < 500:
        return "client_error"
    return "server_error"


class Telemetry(Protocol):
    """Receives the service's measurements. No prompt or user ever goes into a label."""

    def request_finished(self, outcome: Outcome) -> None:
        """One image request (/generate, /v1/images/...) ended."""

    def images_generated(self, sampler: str, count: int) -> None:
        """A pipeline call made ``count`` images with ``sampler``."""

    def stage_seconds(self, stage: Stage, seconds: float) -> None:
        """One generation batch, scoring call or upload took ``seconds``."""

    def jobs_in_flight(self, change: int) -> None:
        """Sampling jobs dispatched and not yet returned changed by ``change``."""

    def job_finished(self, outcome: JobOutcome) -> None:
        """A job (POST /jobs) ended."""

    def job_started(self, queued_s: float) -> None:
        """A job was taken up for its first run after waiting ``queued_s`` in the queue."""

    def jobs_queued(self, depth: int) -> None:
        """``depth`` jobs wait in the queue for a runner."""

    def webhook_delivery(self, outcome: DeliveryOutcome) -> None:
        """One attempt to deliver a webhook ended so."""

    def adapter_cache(self, outcome: AdapterOutcome) -> None:
        """A worker found a batch's adapter loaded (hit), had to load it (miss), or unloaded one
        to make room (evicted)."""


class NoTelemetry:
    """Reports nowhere: for tools and tests that run the service outside a cluster."""

    def request_finished(self, outcome: Outcome) -> None:
        pass

    def images_generated(self, sampler: str, count: int) -> None:
        pass

    def stage_seconds(self, stage: Stage, seconds: float) -> None:
        pass

    def jobs_in_flight(self, change: int) -> None:
        pass

    def job_finished(self, outcome: JobOutcome) -> None:
        pass

    def job_started(self, queued_s: float) -> None:
        pass

    def jobs_queued(self, depth: int) -> None:
        pass

    def webhook_delivery(self, outcome: DeliveryOutcome) -> None:
        pass

    def adapter_cache(self, outcome: AdapterOutcome) -> None:
        pass
