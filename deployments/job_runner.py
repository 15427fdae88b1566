"""JobRunner: the task consumer that runs jobs, driving FluxWorker and Scorer like the ingress.

It needs no GPU: it plans, scores through the Scorer, stores and keeps the job records, while the
GPU work happens on FluxWorker replicas, which /generate shares. Celery's task handlers are
synchronous and run in Celery's thread pool; each one hands its job to one event loop of the
replica, where the handles and the Redis client live.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from celery.exceptions import Reject
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.task_consumer import task_consumer, task_handler

from deployments.handles import generation_service
from deployments.job_queue import RUN_JOB, CeleryJobQueue, jobs_task_config
from deployments.telemetry import RayTelemetry
from serve_app.jobs.runner import JobRunner as Runner
from serve_app.jobs.store import JobStore, JobStoreUnavailable
from serve_app.settings import get_settings
from serve_app.storage.factory import make_store

logger = logging.getLogger("ray.serve")

# Ray's metrics agent drops a gauge that was not set again within two export intervals (one
# second at the least), so the queue depth is set every second: one LLEN per runner replica.
_QUEUE_REPORT_S = 1.0


@task_consumer(task_processor_config=jobs_task_config(get_settings()))
class _JobConsumer:
    """Takes job runs off the queue."""

    def __init__(self, worker: DeploymentHandle, scorer: DeploymentHandle) -> None:
        settings = get_settings()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="jobs", daemon=True).start()
        telemetry = RayTelemetry()
        self.store = JobStore(
            settings.redis_url,
            retention_s=settings.jobs_retention_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
        )
        service = generation_service(worker, scorer, settings, make_store(settings), telemetry)
        self.runner = Runner(settings, self.store, service, CeleryJobQueue(settings), telemetry)
        self._queue = settings.jobs_queue
        self._telemetry = telemetry
        asyncio.run_coroutine_threadsafe(self._report_queue(), self._loop)

    async def _report_queue(self) -> None:
        while True:
            try:
                self._telemetry.jobs_queued(await self.store.queue_length(self._queue))
            except JobStoreUnavailable as error:
                logger.warning("queue depth unknown: %s", error)
            await asyncio.sleep(_QUEUE_REPORT_S)

    @task_handler(name=RUN_JOB)  # type: ignore[untyped-decorator]
    def run_job(self, job_id: str) -> str:
        """One delivery of a job's task."""
        outcome = asyncio.run_coroutine_threadsafe(self.runner.run(job_id), self._loop).result()
        if outcome == "handed_back":
            # The runner could not queue the job again itself: Celery's requeue is the fallback
            # (and, should that be lost too, the redelivery timeout).
            raise Reject(f"job {job_id} handed back: the replica is stopping", requeue=True)
        return outcome


@serve.deployment(ray_actor_options={"num_cpus": 0.25, "num_gpus": 0}, max_ongoing_requests=4)
class JobRunner(_JobConsumer):
    """Runs up to max_ongoing_requests jobs at once; hands them back when it stops."""

    def __del__(self) -> None:
        # Before Ray stops the Celery worker, which waits for the running tasks: they end at
        # their next tick and queue their jobs again, with the images stored so far.
        self.runner.hand_back()
        super().__del__()  # type: ignore[misc]  # the consumer's, which stops Celery

    def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises: its event loop is gone."""
        if not self._loop.is_running():
            raise RuntimeError("the job runner's event loop stopped")

    def describe(self) -> dict[str, Any]:
        """Where this replica's jobs go, for tests and operators."""
        return {"queue": self._queue, "replica": serve.get_replica_context().replica_tag}
