"""The contract of ``/jobs``: the request (``/generate``'s body and a webhook), the job object."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from serve_app.schemas import ErrorBody, GeneratedImage, GenerateRequest, GenerateResponse

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

_MAX_URL_CHARS = 2048


class JobRequest(GenerateRequest):
    """A request for images of one prompt, made in the background: ``/generate``'s body (every
    field of it, with the same defaults and limits) plus where to announce the end."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red cat on a blue sofa",
                    "nof_images": 16,
                    "webhook": "https://example.com/hooks/flux",
                }
            ]
        },
    )

    stream: bool = Field(
        False,
        description="Not for jobs: follow a job with GET /jobs/{id} or its webhook. true is "
        "refused.",
    )
    webhook: str | None = Field(
        None,
        max_length=_MAX_URL_CHARS,
        description="http or https URL that gets the job object, signed as Standard Webhooks "
        "says, when the job succeeds, fails or is cancelled. Its host must be public or on the "
        "deployment's allow-list.",
        examples=["https://example.com/hooks/flux"],
    )

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, stream: bool) -> bool:
        if stream:
            raise PydanticCustomError(
                "stream_not_for_jobs",
                "jobs do not stream: poll GET /jobs/<id>, or give a webhook",
            )
        return stream

    def generation(self) -> GenerateRequest:
        """The ``/generate`` request this job makes."""
        return GenerateRequest.model_validate_json(
            self.model_dump_json(exclude={"webhook"}, exclude_unset=True)
        )


class JobProgress(BaseModel):
    """How far a job is, in images."""

    done: int = Field(description="Images stored so far.", examples=[4])
    total: int = Field(
        description="Images the job returns: nof_images, or top_k (with top_k the images are "
        "stored once all are ranked, so done jumps to total at the end).",
        examples=[16],
    )


class Job(BaseModel):
    """A job: its state, the images stored so far and, once it has ended, its outcome."""

    id: str = Field(description="The job's id.", examples=["0b5f9a3c8e1d4f2a9c7b6e5d4c3b2a19"])
    status: JobStatus = Field(
        description="queued (waiting for a worker), running, succeeded, failed or cancelled."
    )
    progress: JobProgress
    images: list[GeneratedImage] = Field(
        description="The images stored so far, in job order (best first with top_k)."
    )
    result: GenerateResponse | None = Field(
        None, description="The full /generate response, once the job succeeded."
    )
    error: ErrorBody | None = Field(None, description="What went wrong, once the job failed.")
    created_at: datetime = Field(description="When the job was accepted (UTC).")
    started_at: datetime | None = Field(None, description="When a worker first took it up.")
    finished_at: datetime | None = Field(
        None, description="When it succeeded, failed or was cancelled."
    )

    @property
    def finished(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES
