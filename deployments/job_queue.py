"""The job queue on Ray Serve's asynchronous inference: Celery over Redis, through Ray's Celery
adapter, with what the adapter leaves to Celery's own configuration.

Ray's adapter sets acks_late (a task leaves the queue only once it has ended) and
reject_on_worker_lost, runs a thread pool as wide as the consumer's max_ongoing_requests, and
retries a handler's exceptions with exponential backoff. Added here through Celery's API:

- ``worker_prefetch_multiplier`` 1: a replica reserves only the jobs it runs; the rest stay in
  the Redis list, where other replicas and FluxWorker's autoscaling policy see them.
- ``visibility_timeout`` (FLUX_SERVE_JOBS_REDELIVERY_S) with a fast restore sweep: with Redis, a
  task taken by a replica that is killed comes back only once this has passed since it was taken.
  A job that runs longer is delivered a second time while it runs; the job store's lease makes
  that copy stand by instead of running the job twice (serve_app/jobs/runner.py).
- ``dont_autoretry_for`` Reject: a replica that stops hands its job back at once.
- short publish retries and connect timeouts, so that a submission with Redis down gets its 503
  quickly.
- ``ignore_result`` on every task sent: the job store keeps a job's state and result, so Celery
  storing its own (a write and a publish per run) and subscribing to it at each submission (a
  subscribe and an unsubscribe) would cost Redis round trips for nothing.
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import instantiate_adapter_from_config

from serve_app.api.outbound import OutboundURLRefused
from serve_app.jobs.webhooks import WebhookDelivery
from serve_app.settings import ServiceSettings

RUN_JOB = "flux_serve.run_job"
DELIVER_WEBHOOK = "flux_serve.deliver_webhook"


_CELERY_CONFIG: dict[str, Any] = {
    "worker_prefetch_multiplier": 1,
    "worker_hijack_root_logger": False,
    "broker_connection_retry_on_startup": True,
    "broker_connection_timeout": 2,
    "task_publish_retry_policy": {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 1,
    },
    "redis_socket_connect_timeout": 2,
}


def _adapter_config(settings: ServiceSettings, task_options: dict[str, Any]) -> CeleryAdapterConfig:
    return CeleryAdapterConfig(
        broker_url=settings.redis_url,
        backend_url=settings.redis_url,
        app_custom_config=_CELERY_CONFIG,
        task_custom_config=task_options,
        broker_transport_options={
            "visibility_timeout": settings.jobs_redelivery_s,
            "unacked_restore_interval": max(1, settings.jobs_redelivery_s // 4),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2,
        },
    )


def jobs_task_config(settings: ServiceSettings) -> TaskProcessorConfig:
    """The queue of job runs. Celery retries a failed run without end: the job store counts the
    runs and fails the job after FLUX_SERVE_JOBS_MAX_ATTEMPTS."""
    return TaskProcessorConfig(
        queue_name=settings.jobs_queue,
        adapter_config=_adapter_config(settings, {"dont_autoretry_for": (Reject,)}),
        max_retries=None,
    )


def webhooks_task_config(settings: ServiceSettings) -> TaskProcessorConfig:
    """The queue of webhook deliveries: retried with exponential backoff, a bounded number of
    times; a URL refused at delivery time is not retried."""
    options = {
        "retry_backoff": settings.webhook_backoff_s,
        "dont_autoretry_for": (OutboundURLRefused,),
    }
    return TaskProcessorConfig(
        queue_name=settings.webhooks_queue,
        adapter_config=_adapter_config(settings, options),
        max_retries=settings.webhook_max_attempts - 1,
    )


class CeleryJobQueue:
    """Puts job runs and webhook deliveries on their Celery queues (blocking calls)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._jobs = instantiate_adapter_from_config(jobs_task_config(settings))
        self._webhooks = instantiate_adapter_from_config(webhooks_task_config(settings))

    def submit(self, job_id: str, delay_s: float = 0) -> None:
        """Queue a run of the job, at once or after ``delay_s``."""
        options = {"countdown": delay_s} if delay_s else {}
        self._jobs.enqueue_task_sync(RUN_JOB, args=[job_id], ignore_result=True, **options)

    def send_webhook(self, delivery: WebhookDelivery) -> None:
        """Queue a webhook delivery."""
        self._webhooks.enqueue_task_sync(
            DELIVER_WEBHOOK, args=[delivery.model_dump()], ignore_result=True
        )
