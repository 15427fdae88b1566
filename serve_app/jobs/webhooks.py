"""Webhooks: the job object, signed as the Standard Webhooks specification says, POSTed once the
job has ended.

The body is serialized once, when the job ends; each delivery attempt signs it with its own
timestamp (receivers refuse stale ones) under one ``webhook-id``, so a receiver that got an
earlier attempt can tell a repeat. The URL is checked again at every attempt: a host may resolve
elsewhere by then.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
from pydantic import BaseModel, Field
from standardwebhooks import Webhook

from serve_app.api.outbound import check_outbound_url
from serve_app.jobs.schemas import Job

WEBHOOK_SCHEMES = ("http", "https")


class WebhookDelivery(BaseModel):
    """One webhook to deliver: where, under which message id, with which body."""

    url: str = Field(description="The job's webhook URL.")
    message_id: str = Field(description="The webhook-id header: one per job end.")
    body: str = Field(description="The job object, as JSON.")

    @classmethod
    def for_job(cls, job: Job, url: str) -> WebhookDelivery:
        """The delivery that announces how ``job`` ended."""
        return cls(url=url, message_id=f"msg_{job.id}", body=job.model_dump_json())


class WebhookFailed(RuntimeError):
    """The receiver did not take the webhook (no answer in time, or not a 2xx): retry later."""


def signed_headers(secret: str, message_id: str, body: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for ``body`` sent at ``at``."""
    signature = Webhook(secret).sign(message_id, at, body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def deliver(
    delivery: WebhookDelivery, *, secret: str, allowed_hosts: list[str], timeout_s: float
) -> None:
    """POST the webhook once. Raises OutboundURLRefused when its URL may not be called (no point
    retrying), WebhookFailed when the receiver did not take it. Blocking."""
    check_outbound_url(delivery.url, schemes=WEBHOOK_SCHEMES, allowed_hosts=allowed_hosts)
    headers = signed_headers(secret, delivery.message_id, delivery.body, datetime.now(UTC))
    try:
        # No redirects: a redirect could lead to a host the check above would refuse.
        response = httpx.post(
            delivery.url,
            content=delivery.body.encode(),
            headers=headers,
            timeout=timeout_s,
            follow_redirects=False,
        )
    except httpx.HTTPError as error:
        raise WebhookFailed(f"{delivery.url}: {type(error).__name__}: {error}") from error
    if not response.is_success:
        raise WebhookFailed(f"{delivery.url} answered {response.status_code}")
