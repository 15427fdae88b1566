"""WebhookSender: the task consumer that delivers webhooks, off every GPU's time."""

from __future__ import annotations

import logging

import celery
from ray import serve
from ray.serve.task_consumer import task_consumer, task_handler

from deployments.job_queue import DELIVER_WEBHOOK, webhooks_task_config
from deployments.telemetry import RayTelemetry
from serve_app.api.outbound import OutboundURLRefused
from serve_app.jobs.webhooks import WebhookDelivery, WebhookFailed, deliver
from serve_app.settings import get_settings

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.1, "num_gpus": 0}, max_ongoing_requests=8)
@task_consumer(task_processor_config=webhooks_task_config(get_settings()))
class WebhookSender:
    """POSTs each job's end to its webhook; Celery retries a delivery with backoff."""

    def __init__(self) -> None:
        self.settings = get_settings()
        self.telemetry = RayTelemetry()

    @task_handler(name=DELIVER_WEBHOOK)  # type: ignore[untyped-decorator]
    def deliver_webhook(self, payload: dict[str, str]) -> str:
        """One delivery attempt; raises (and is retried) while the receiver does not take it."""
        delivery = WebhookDelivery.model_validate(payload)
        secret = self.settings.webhook_secret
        if secret is None:
            logger.error("webhook %s dropped: no FLUX_SERVE_WEBHOOK_SECRET", delivery.message_id)
            self.telemetry.webhook_delivery("refused")
            return "refused"
        try:
            deliver(
                delivery,
                secret=secret.get_secret_value(),
                allowed_hosts=self.settings.webhook_allowed_hosts,
                timeout_s=self.settings.webhook_timeout_s,
            )
        except OutboundURLRefused as error:
            logger.error("webhook %s refused: %s", delivery.message_id, error)
            self.telemetry.webhook_delivery("refused")
            return "refused"
        except WebhookFailed as error:
            # celery.current_task, not an imported proxy: Serve pickles this class, proxy and all.
            last = celery.current_task.request.retries + 1 >= self.settings.webhook_max_attempts
            self.telemetry.webhook_delivery("failed" if last else "retrying")
            logger.warning(
                "webhook %s not delivered%s: %s",
                delivery.message_id,
                " (giving up)" if last else "",
                error,
            )
            raise
        self.telemetry.webhook_delivery("delivered")
        return "delivered"
