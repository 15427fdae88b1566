"""How render calls find a FluxWorker replica.

A worker holds several render calls at once (its ``max_ongoing_requests``) and takes turns between
them, so where a call lands decides how many GPUs a request gets. Ray Serve's default router
compares two replicas picked at random: the shards of one request (``gpus`` > 1) could share a
replica while another idles, and then take turns on one GPU. This router sends each call to the
replica with the fewest calls, and keeps the shards of one request on distinct replicas while
there are enough of them. Among replicas equally busy, it prefers one that already holds the
call's LoRA adapters, so that a replica loads an adapter seldom; where none holds them all, the
one holding the fewest adapters, whose cache loses the least by loading them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)
from typing_extensions import override

from serve_app.generation.planning import SamplingJob

# A pick that routing never confirmed (the replica could not take the call) stops counting then.
_PICK_TTL_S = 10.0
# The key of FluxWorker.record_routing_stats under which a replica lists its adapters' digests.
ADAPTERS_STAT = "adapters"
# Adapters of a call routed to a replica count as held there this long (the replica's own report,
# every request_routing_stats_period_s, says so only once it has loaded them).
_SENT_TTL_S = 15.0


def call_adapters(pending: PendingRequest | None) -> frozenset[str]:
    """The digests of the adapters a render call's jobs apply."""
    if pending is None or not pending.args or not isinstance(pending.args[0], list):
        return frozenset()
    return frozenset(
        lora.digest
        for job in pending.args[0]
        if isinstance(job, SamplingJob)
        for lora in job.params.loras
        if lora.digest is not None
    )


@dataclass(frozen=True)
class _Pick:
    """The replica chosen for a call that is not yet routed."""

    pending: PendingRequest
    replica_id: ReplicaID
    at: float


class RenderCallRouter(FIFOMixin, RequestRouter):  # type: ignore[misc]
    """Least busy replica first; one that already has a call of the same request comes after;
    among equals, one that holds the call's adapters.

    A replica's calls are what this router sent there and has not seen end, counted from the
    moment it picks the replica (calls routed in one burst would otherwise all see the same idle
    replica), or the replica's own count as Ray Serve last heard it, whichever is more (that one
    includes other routers' calls, but is forgotten after a few seconds without news). The calls
    of one request share Ray Serve's internal request id (they are made while serving one HTTP
    request), which is how they are recognised. A replica's adapters are those it reported last
    (``routing_stats``) and those of the calls this router sent it lately.

    ``request_router_kwargs``: ``adapter_affinity`` (default true); false leaves adapters out.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routed: Counter[tuple[str, ReplicaID]] = Counter()
        """Calls routed and not yet ended, by (internal request id, replica)."""
        self._picks: dict[int, _Pick] = {}
        """Calls not yet routed, by the id() of their pending request (which the pick holds)."""
        self._sent: dict[ReplicaID, dict[str, float]] = {}
        """Adapters of the calls routed to each replica lately, with when."""
        self._adapter_affinity = True

    @override
    def initialize_state(self, adapter_affinity: bool = True, **kwargs: Any) -> None:
        """Take the deployment's request_router_kwargs."""
        super().initialize_state(**kwargs)
        self._adapter_affinity = adapter_affinity

    def _held(self, replica: RunningReplica, now: float) -> set[str]:
        """The adapters ``replica`` holds, as far as this router knows."""
        reported = replica.routing_stats.get(ADAPTERS_STAT) or []
        sent = self._sent.get(replica.replica_id, {})
        return set(reported) | {digest for digest, at in sent.items() if now - at < _SENT_TTL_S}

    @override
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, best first."""
        now = time.monotonic()
        self._picks = {
            key: pick
            for key, pick in self._picks.items()
            if not pick.pending.future.cancelled() and now - pick.at < _PICK_TTL_S
        }
        request = pending_request.metadata.internal_request_id if pending_request else None
        calls: Counter[ReplicaID] = Counter()
        of_request: Counter[ReplicaID] = Counter()
        for (routed_request, replica_id), count in self._routed.items():
            calls[replica_id] += count
            if routed_request == request:
                of_request[replica_id] += count
        for pick in self._picks.values():
            if pick.pending is not pending_request:
                calls[pick.replica_id] += 1
                if pick.pending.metadata.internal_request_id == request:
                    of_request[pick.replica_id] += 1

        wanted = call_adapters(pending_request) if self._adapter_affinity else frozenset()

        def preference(replica: RunningReplica) -> tuple[bool, int, int, int, int, str]:
            heard = self.replica_queue_len_cache.get(replica.replica_id) or 0
            load = max(calls[replica.replica_id], heard)
            held = self._held(replica, now) if wanted else set()
            return (
                load >= replica.max_ongoing_requests,
                of_request[replica.replica_id],
                load,
                len(wanted - held),
                len(held),
                replica.replica_id.unique_id,
            )

        ranked = sorted(candidate_replicas, key=preference)
        if pending_request is not None and ranked:
            self._picks[id(pending_request)] = _Pick(pending_request, ranked[0].replica_id, now)
        return [[replica] for replica in ranked]

    @override
    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """Count the call against its replica until it ends; its adapters are held there now."""
        self._picks.pop(id(pending_request), None)
        self._routed[pending_request.metadata.internal_request_id, replica_id] += 1
        now = time.monotonic()
        sent = {
            digest: at
            for digest, at in self._sent.get(replica_id, {}).items()
            if now - at < _SENT_TTL_S
        }
        sent.update(dict.fromkeys(call_adapters(pending_request), now))
        self._sent[replica_id] = sent

    @override
    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A call ended (or was refused by a full replica): it no longer counts."""
        key = (internal_request_id, replica_id)
        self._routed[key] -= 1
        if self._routed[key] <= 0:
            del self._routed[key]
