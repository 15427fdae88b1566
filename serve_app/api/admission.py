"""Admission by cost: admit a request only when it and the work already admitted can finish
before their deadlines, at the speed the workers are measured to work; refuse it at once otherwise.

A fixed count of requests can't tell one 128x128 image from sixty-four at 1024x1024. Here every
request's work is estimated from its plan (generation/cost.py), and every finished batch tells how
fast its worker goes. The workers do all admitted work, whatever its order, by the time its sum
divided by their speed has passed; admitting a request must keep that within the earliest of
the admitted requests' deadlines (the new one's included), or some admitted client would wait
for a 504 while the workers compute images nobody gets.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable

from serve_app.faults import KeyAtCapacity, Overloaded
from serve_app.generation.cost import job_work, work_of
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.settings import ServiceSettings


class WorkerSpeeds:
    """A moving estimate of each FluxWorker replica's speed, in work units per second, updated
    by the batches it finishes; replicas not yet heard from count at a conservative prior."""

    def __init__(self, *, prior: float, window_s: float, replicas: int) -> None:
        self.prior = prior
        self.replicas = replicas
        self._window_s = window_s
        self._speeds: OrderedDict[str, float] = OrderedDict()
        """Units per second by worker, the most recently heard last."""

    def observe(self, worker: str, units: float, seconds: float) -> None:
        """``worker`` made ``units`` of work in ``seconds`` of pipeline time."""
        if units <= 0 or seconds <= 0:
            return
        sample = units / seconds
        known = self._speeds.pop(worker, None)
        if known is None:
            self._speeds[worker] = sample
        else:
            # Weighed by time, so that one long batch counts as much as many short ones.
            weight = 1 - math.exp(-seconds / self._window_s)
            self._speeds[worker] = known + weight * (sample - known)
        # Replicas that were replaced stop reporting; the most recent ones stand for them all.
        while len(self._speeds) > self.replicas:
            self._speeds.popitem(last=False)

    def speed(self, worker: str) -> float | None:
        """The estimate for ``worker``; None before it reported a batch."""
        return self._speeds.get(worker)

    def capacity(self) -> float:
        """Units per second of the workers at max replicas: the measured ones, and the prior for
        the replicas that have not reported yet (or that autoscaling will add)."""
        measured = list(self._speeds.values())
        return sum(measured) + (self.replicas - len(measured)) * self.prior


class Ticket:
    """One admitted request: the work it has left, its deadline and its API key."""

    def __init__(self, admission: Admission, work: float, deadline: float, key: str | None) -> None:
        self.remaining = work
        self.deadline = deadline
        self.key = key
        self._admission = admission

    def progress(self, images: list[RenderedImage]) -> None:
        """Count ``images`` as done, and learn from them how fast their workers are."""
        units: defaultdict[str, float] = defaultdict(float)
        seconds: defaultdict[str, float] = defaultdict(float)
        for image in images:
            units[image.worker] += job_work(image.job, self._admission.settings)
            seconds[image.worker] += image.compute_s
        for worker, made in units.items():
            self._admission.speeds.observe(worker, made, seconds[worker])
        self.remaining = max(0.0, self.remaining - sum(units.values()))

    def release(self) -> None:
        """The request ended (finished, failed or abandoned); releasing twice is harmless."""
        self._admission.tickets.discard(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def _seconds(value: float) -> int:
    """A Retry-After value: whole seconds, at least one."""
    return max(1, math.ceil(value))


class Admission:
    """Admits requests by the cost of their plans against the workers' measured speed."""

    def __init__(
        self, settings: ServiceSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.speeds = WorkerSpeeds(
            prior=settings.admission_prior_speed,
            window_s=settings.admission_speed_window_s,
            replicas=settings.max_gpus_per_request,  # FluxWorker's max_replicas (a test ties them)
        )
        self.tickets: set[Ticket] = set()
        self._clock = clock

    def backlog(self, key: str | None = None) -> float:
        """Work units admitted and not yet done (of one key's requests, given ``key``)."""
        return sum(t.remaining for t in self.tickets if key is None or t.key == key)

    def admit(
        self,
        jobs: list[SamplingJob],
        gpus: int = 1,
        key: str | None = None,
        elsewhere: str | None = None,
    ) -> Ticket:
        """A ticket for a request of ``jobs`` over ``gpus`` workers, sent with API key ``key``;
        Overloaded (503) when it or the work admitted before it could not finish in time,
        KeyAtCapacity (429) when ``key`` holds its share already. ``elsewhere`` names where a
        refused request may go instead."""
        settings = self.settings
        if len(self.tickets) >= settings.max_concurrent_requests:
            raise Overloaded(
                f"the service is at capacity ({settings.max_concurrent_requests} requests in "
                "progress)"
            )
        now = self._clock()
        capacity = self.speeds.capacity()
        own = work_of(jobs, settings)
        share = settings.admission_deadline_share
        deadline = settings.request_timeout_s
        hint = f", or send it to {elsewhere}" if elsewhere else ""
        if key is not None:
            allowed = settings.admission_key_share * share * deadline * capacity
            held = self.backlog(key)
            if held + own > allowed:
                raise KeyAtCapacity(
                    f"this API key's requests in progress hold {held / capacity:.0f} s of the "
                    f"workers' time; with this request's {own / capacity:.0f} s that is more than "
                    f"its share ({settings.admission_key_share:.0%}) of what the service admits; "
                    f"retry later{hint}",
                    retry_after_s=_seconds((held + own - allowed) / capacity),
                )
        window = min([deadline, *(t.deadline - now for t in self.tickets)])
        # Each of its shards runs on one worker: alone, it takes its work over `gpus` of them.
        workers = min(gpus, self.speeds.replicas)
        alone = own / (workers * capacity / self.speeds.replicas)
        needed = max((self.backlog() + own) / capacity, alone)
        if needed > share * window:
            if alone > share * deadline:
                reason = (
                    f"this request needs about {alone:.0f} s on {workers} worker(s), more than "
                    f"its {deadline:g} s deadline allows even when they are idle; ask for fewer "
                    "images or more gpus"
                )
            else:
                reason = (
                    f"the workers are busy: this request and the work admitted before it need "
                    f"about {needed:.0f} s, more than the {share * window:.0f} s their deadlines "
                    "leave"
                )
            raise Overloaded(
                f"the service is at capacity: {reason}; retry later{hint}",
                retry_after_s=_seconds(needed - share * window),
            )
        ticket = Ticket(self, own, now + deadline, key)
        self.tickets.add(ticket)
        return ticket
