"""Job records in Redis: state, plan, images stored so far, the runner's lease, idempotency keys.

Every change of state is one Lua script, so a cancellation, a runner taking the job and a runner
finishing it can't interleave: a job is cancelled or finished once, and only the runner holding
the lease may finish it. The queue itself is Celery's (deployments/job_queue.py); this store
keeps what Celery does not: the job object that GET /jobs/{id} answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from serve_app.generation.planning import SamplingJob
from serve_app.jobs.schemas import Job, JobProgress, JobRequest
from serve_app.schemas import ErrorBody, GeneratedImage, GenerateResponse

_PREFIX = "flux-serve:job:"
# The longest one store call may take: beyond it Redis counts as unreachable.
_CALL_TIMEOUT_S = 5
_IDEMPOTENCY_PREFIX = "flux-serve:idempotency:"


class JobStoreUnavailable(RuntimeError):
    """Redis, the jobs' broker and store, can't be reached; the message names it."""


class IdempotencyConflict(ValueError):
    """An Idempotency-Key already names a job made from another body."""


class JobNotFound(LookupError):
    """No such job, or not one of the caller's."""


class JobFinished(ValueError):
    """The job has ended already: it can't be cancelled."""


@dataclass(frozen=True)
class Created:
    """The job a submission names: a new one, or the one its Idempotency-Key made before."""

    job_id: str
    new: bool
    enqueued: bool
    """Whether the job's task reached the queue (a replay enqueues it when not)."""


@dataclass(frozen=True)
class JobRecord:
    """What a runner needs of a job."""

    job_id: str
    status: str
    request: JobRequest
    base_url: str
    attempt: str
    """The job's part of its image keys: fixed per job, so a second run writes the same keys."""
    webhook: str | None
    notified: bool
    created_at: float


ClaimOutcome = Literal["claimed", "leased", "final", "exhausted", "missing"]


@dataclass(frozen=True)
class Claim:
    """What a runner got when it tried to take a job for a run."""

    outcome: ClaimOutcome
    """claimed: this run holds it; leased: another runner does; final: it has ended;
    exhausted: its runs are used up; missing: no such job (any more)."""
    detail: str
    """claimed: the run's number; leased: the status; final: the status; exhausted: the runs."""
    first: bool = False
    """claimed: whether this is the job's first run (it leaves the queue for the first time)."""
    record: JobRecord | None = None
    """claimed: the job, as it is now."""


# KEYS: job, lease. ARGV: token, lease ms, now, max attempts. A claim returns the job's fields
# too (flat, as HGETALL does): the runner needs them next, and a round trip less starts it sooner.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', '', 0} end
if status ~= 'queued' and status ~= 'running' then return {'final', status, 0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'leased', status, 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[4]) then return {'exhausted', tostring(attempts - 1), 0} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'running')
local first = redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
return {'claimed', tostring(attempts), first, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: job, lease. ARGV: token, lease ms. The job's status, or false when another runner holds
# the lease (or the job is gone). A lease that lapsed unclaimed (its runner was slow to renew)
# is taken again: nobody else runs the job, so this runner must not give it up.
_RENEW = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return false end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
return status
"""

# KEYS: job, lease. ARGV: token, refund (1: the run does not count, it was handed back).
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
end
return 1
"""

# KEYS: job, lease, images, plan. ARGV: token, status, field, value, now, retention s.
# With a status: end the job, if it is running (or queued) and ``token`` ('' for any) holds it,
# or nobody does (the lease lapsed while the runner was slow: its result is still the job's).
# Then, for a job that has ended by whatever way: drop the lease and let the records expire.
# 1 when this call ended the job.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
local holder = redis.call('GET', KEYS[2])
local ended = 0
if ARGV[2] ~= '' and (status == 'running' or status == 'queued') and
   (ARGV[1] == '' or not holder or holder == ARGV[1]) then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[5], ARGV[3], ARGV[4])
  status = ARGV[2]
  ended = 1
end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  if holder and holder == ARGV[1] then redis.call('DEL', KEYS[2]) end
  for _, key in ipairs({KEYS[1], KEYS[3], KEYS[4]}) do
    redis.call('EXPIRE', key, ARGV[6])
  end
end
return ended
"""

# KEYS: job, lease, images, plan. ARGV: owner, now, retention s. The status before, or false.
_CANCEL = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return false end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  for _, key in ipairs({KEYS[1], KEYS[3], KEYS[4]}) do
    redis.call('EXPIRE', key, ARGV[3])
  end
end
return status
"""

# KEYS: job, idempotency key (or the job's own key twice).
# ARGV: fields JSON, body fingerprint, ttl s, job id. [fingerprint, job id] of a known key.
_CREATE = """
if KEYS[2] ~= KEYS[1] then
  local known = redis.call('GET', KEYS[2])
  if known then return cjson.decode(known) end
  redis.call('SET', KEYS[2], cjson.encode({ARGV[2], ARGV[4]}), 'EX', ARGV[3])
end
local fields = cjson.decode(ARGV[1])
for name, value in pairs(fields) do redis.call('HSET', KEYS[1], name, value) end
return false
"""


def redacted(url: str) -> str:
    """``url`` without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


def _record_of(job_id: str, fields: dict[str, str]) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        status=fields["status"],
        request=JobRequest.model_validate_json(fields["request"]),
        base_url=fields["base_url"],
        attempt=fields["attempt"],
        webhook=fields.get("webhook") or None,
        notified=bool(fields.get("notified")),
        created_at=float(fields["created_at"]),
    )


class JobStore:
    """Jobs in one Redis database."""

    def __init__(self, url: str, *, retention_s: int, idempotency_ttl_s: int) -> None:
        self.url = url
        self._retention_s = retention_s
        self._idempotency_ttl_s = idempotency_ttl_s
        # Short timeouts: with Redis down, a submission must get its 503 quickly. No
        # socket_timeout (redis-py's default is 5 s): with one, redis-py sends each command under
        # asyncio.wait_for, which on Python 3.11 loses a cancellation that lands as the send
        # completes (a job's lease renewal then outlived its job, renewing it for ever).
        # _reachable bounds each call instead.
        self._redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=None,
            health_check_interval=10,
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._finish = self._redis.register_script(_FINISH)
        self._cancel = self._redis.register_script(_CANCEL)
        self._create = self._redis.register_script(_CREATE)

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                yield
        except (RedisError, OSError) as error:  # OSError: the timeout's TimeoutError too
            reason = str(error) or f"no answer within {_CALL_TIMEOUT_S} s"
            raise JobStoreUnavailable(
                f"the job broker (Redis at {redacted(self.url)}) can't be reached: {reason}"
            ) from error

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        job = f"{_PREFIX}{job_id}"
        return [job, f"{job}:lease", f"{job}:images", f"{job}:plan"]

    async def check(self) -> None:
        """Raise JobStoreUnavailable unless Redis answers."""
        async with self._reachable():
            await self._redis.ping()

    async def create(
        self,
        job_id: str,
        *,
        owner: str,
        request: JobRequest,
        base_url: str,
        attempt: str,
        now: float,
        idempotency: tuple[str, str] | None = None,
    ) -> Created:
        """Record a queued job; with ``idempotency`` (key, body fingerprint), the job that key
        made before instead, or IdempotencyConflict when it was made from another body."""
        fields = {
            "status": "queued",
            "owner": owner,
            "request": request.model_dump_json(exclude_unset=True),
            "base_url": base_url,
            "attempt": attempt,
            "webhook": request.webhook or "",
            "created_at": repr(now),
            "attempts": "0",
        }
        job_key = self._keys(job_id)[0]
        known_key = job_key
        fingerprint = ""
        if idempotency is not None:
            key, fingerprint = idempotency
            known_key = f"{_IDEMPOTENCY_PREFIX}{owner}:{key}"
        async with self._reachable():
            known = await self._create(
                keys=[job_key, known_key],
                args=[json.dumps(fields), fingerprint, self._idempotency_ttl_s, job_id],
            )
            if not known:
                return Created(job_id, new=True, enqueued=False)
            known_fingerprint, known_id = known
            if known_fingerprint != fingerprint:
                raise IdempotencyConflict("this Idempotency-Key was used with another request body")
            enqueued = await self._redis.hget(self._keys(known_id)[0], "enqueued")
        return Created(known_id, new=False, enqueued=bool(enqueued))

    async def mark_enqueued(self, job_id: str) -> None:
        """Note that the job's task reached the queue."""
        async with self._reachable():
            await self._redis.hset(self._keys(job_id)[0], "enqueued", "1")

    async def forget(self, job_id: str) -> None:
        """Remove a job that never reached the queue (its submission failed)."""
        async with self._reachable():
            await self._redis.delete(*self._keys(job_id))

    async def job(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job object; None if there is no such job, or ``owner`` did not make it."""
        keys = self._keys(job_id)
        async with self._reachable():
            fields, stored = await self._fields_and_images(keys)
        if not fields or (owner is not None and fields.get("owner") != owner):
            return None
        request = JobRequest.model_validate_json(fields["request"])
        images = sorted(
            (GeneratedImage.model_validate_json(image) for image in stored.values()),
            key=lambda image: image.index,
        )
        result = (
            GenerateResponse.model_validate_json(fields["result"]) if "result" in fields else None
        )
        if result is not None:
            images = result.images
        error = ErrorBody.model_validate_json(fields["error"]) if "error" in fields else None
        created_at = _timestamp(fields["created_at"])
        assert created_at is not None
        return Job(
            id=job_id,
            status=fields["status"],
            progress=JobProgress(done=len(images), total=request.top_k or request.nof_images),
            images=images,
            result=result,
            error=error,
            created_at=created_at,
            started_at=_timestamp(fields.get("started_at")),
            finished_at=_timestamp(fields.get("finished_at")),
        )

    async def _fields_and_images(self, keys: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys[0])
            pipe.hgetall(keys[2])
            fields, images = await pipe.execute()
        return fields, images

    async def record(self, job_id: str) -> JobRecord | None:
        """What a runner needs of the job; None if there is no such job (any more)."""
        async with self._reachable():
            fields = cast(dict[str, str], await self._redis.hgetall(self._keys(job_id)[0]))
        return _record_of(job_id, fields) if fields else None

    async def cancel(self, job_id: str, owner: str, now: float) -> str | None:
        """Cancel a queued or running job; its status before (a final one: nothing changed), or
        None if there is no such job of ``owner``."""
        async with self._reachable():
            before = await self._cancel(
                keys=self._keys(job_id), args=[owner, repr(now), self._retention_s]
            )
        return str(before) if before else None

    async def claim(
        self, job_id: str, token: str, *, lease_s: float, now: float, max_attempts: int
    ) -> Claim:
        """Take the job for a run under ``token`` (see Claim)."""
        async with self._reachable():
            reply = await self._claim(
                keys=self._keys(job_id)[:2],
                args=[token, round(lease_s * 1000), repr(now), max_attempts],
            )
        outcome, detail, first = reply[:3]
        if outcome != "claimed":
            return Claim(outcome, detail)
        flat = reply[3]
        record = _record_of(job_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        return Claim(outcome, detail, bool(first), record)

    async def renew(self, job_id: str, token: str, lease_s: float) -> str | None:
        """Extend the lease (or take it again if it lapsed unclaimed); the job's status, or None
        when another runner holds it or the job is gone."""
        async with self._reachable():
            status = await self._renew(
                keys=self._keys(job_id)[:2], args=[token, round(lease_s * 1000)]
            )
        return str(status) if status else None

    async def release(self, job_id: str, token: str, *, handed_back: bool = False) -> None:
        """Give the job up for another run (the lease, if still ours). A run ``handed_back``
        (its replica is stopping) does not count towards the job's attempts."""
        async with self._reachable():
            await self._release(keys=self._keys(job_id)[:2], args=[token, int(handed_back)])

    async def plan(
        self, job_id: str, planned: list[SamplingJob]
    ) -> tuple[list[SamplingJob], dict[int, GeneratedImage]]:
        """The job's plan, ``planned`` on its first run and the first run's on later ones (random
        seeds stay what they were), with the images earlier runs stored, by index."""
        _, _, images_key, plan_key = self._keys(job_id)
        async with self._reachable(), self._redis.pipeline(transaction=True) as pipe:
            pipe.setnx(plan_key, json.dumps([job.model_dump() for job in planned]))
            pipe.get(plan_key)
            pipe.hgetall(images_key)
            _, plan, stored = await pipe.execute()
        return (
            [SamplingJob.model_validate(job) for job in json.loads(plan or "[]")],
            {
                int(index): GeneratedImage.model_validate_json(image)
                for index, image in stored.items()
            },
        )

    async def add_image(self, job_id: str, image: GeneratedImage) -> str | None:
        """Record a stored image; the job's status (None: the job is gone), in the same round
        trip, so that a runner sees a cancellation at the image instead of at its next tick."""
        keys = self._keys(job_id)
        async with self._reachable(), self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys[2], str(image.index), image.model_dump_json())
            pipe.hget(keys[0], "status")
            _, status = await pipe.execute()
        return cast(str | None, status)

    async def finish(
        self,
        job_id: str,
        token: str,
        now: float,
        *,
        result: GenerateResponse | None = None,
        error: ErrorBody | None = None,
    ) -> bool:
        """End a running job as succeeded (``result``) or failed (``error``) unless a runner
        other than this one (``token``; '' for any) holds it; with neither, only settle a job
        that ended otherwise (cancelled): drop the lease, let the records expire. True when this
        call ended it."""
        status, field, value = "", "", ""
        if result is not None:
            status, field, value = "succeeded", "result", result.model_dump_json()
        elif error is not None:
            status, field, value = "failed", "error", error.model_dump_json()
        async with self._reachable():
            ended = await self._finish(
                keys=self._keys(job_id),
                args=[token, status, field, value, repr(now), self._retention_s],
            )
        return bool(ended)

    async def mark_notified(self, job_id: str) -> None:
        """Note that the end of the job went to its webhook's queue."""
        async with self._reachable():
            await self._redis.hset(self._keys(job_id)[0], "notified", "1")

    async def queue_length(self, queue: str) -> int:
        """Messages waiting in a Celery queue (Celery's Redis transport keeps a list per queue)."""
        async with self._reachable():
            return int(await self._redis.llen(queue))

    async def close(self) -> None:
        """Close the connections."""
        await self._redis.aclose()
