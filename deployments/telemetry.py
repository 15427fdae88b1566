"""Telemetry exported through Ray's metrics agent (custom metrics get a ``ray_`` prefix there).

Plain prometheus-client metrics inside a replica would never reach Prometheus: Ray's metrics
export is the only path out of the replicas.
"""

from __future__ import annotations

from ray.serve import metrics

from serve_app.telemetry import AdapterOutcome, DeliveryOutcome, JobOutcome, Outcome, Stage

# Seconds: from a tiny image on a GPU (milliseconds) to a large batch on a CPU (minutes).
_DURATION_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class RayTelemetry:
    """Counters, histograms and a gauge, tagged with the deployment and replica by Ray Serve."""

    def __init__(self) -> None:
        self._requests = metrics.Counter(
            "flux_requests",
            description="Requests to /generate, by outcome.",
            tag_keys=("outcome",),
        )
        self._images = metrics.Counter(
            "flux_images_generated",
            description="Images generated, by sampler.",
            tag_keys=("sampler",),
        )
        self._durations = {
            stage: metrics.Histogram(
                f"flux_{stage}_duration_seconds",
                description=f"Duration of one {stage} call, in seconds.",
                boundaries=_DURATION_BUCKETS,
            )
            for stage in ("generation", "scoring", "upload")
        }
        self._in_flight = metrics.Gauge(
            "flux_jobs_in_flight",
            description="Sampling jobs dispatched to workers and not yet returned.",
        )
        self._in_flight_count = 0
        self._jobs = metrics.Counter(
            "flux_jobs_finished",
            description="Jobs (POST /jobs) that ended, by outcome.",
            tag_keys=("outcome",),
        )
        self._queued = metrics.Histogram(
            "flux_job_queued_seconds",
            description="Time from a job's submission to its first run, in seconds.",
            boundaries=_DURATION_BUCKETS,
        )
        self._queue_depth = metrics.Gauge(
            "flux_jobs_queue_depth", description="Jobs waiting in the queue for a runner."
        )
        self._deliveries = metrics.Counter(
            "flux_webhook_deliveries",
            description="Webhook delivery attempts, by outcome.",
            tag_keys=("outcome",),
        )
        self._adapter_cache = metrics.Counter(
            "flux_lora_cache",
            description="LoRA adapters a worker found loaded (hit), loaded (miss) or unloaded to "
            "make room (evicted).",
            tag_keys=("outcome",),
        )

    def request_finished(self, outcome: Outcome) -> None:
        self._requests.inc(tags={"outcome": outcome})

    def images_generated(self, sampler: str, count: int) -> None:
        self._images.inc(count, tags={"sampler": sampler})

    def stage_seconds(self, stage: Stage, seconds: float) -> None:
        self._durations[stage].observe(seconds)

    def jobs_in_flight(self, change: int) -> None:
        self._in_flight_count += change
        self._in_flight.set(self._in_flight_count)

    def job_finished(self, outcome: JobOutcome) -> None:
        self._jobs.inc(tags={"outcome": outcome})

    def job_started(self, queued_s: float) -> None:
        self._queued.observe(queued_s)

    def jobs_queued(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def webhook_delivery(self, outcome: DeliveryOutcome) -> None:
        self._deliveries.inc(tags={"outcome": outcome})

    def adapter_cache(self, outcome: AdapterOutcome) -> None:
        self._adapter_cache.inc(tags={"outcome": outcome})
