"""How render calls find a FluxWorker replica.

A worker holds several render calls at once (its ``max_ongoing_requests``) and takes turns between
them, so where a call lands decides how many GPUs a request gets. Ray Serve's default router
compares two replicas picked at random: the shards of one request (``gpus`` > 1) could share a
replica while another idles, and then take turns on one GPU. This router sends each call to the
replica with the fewest calls, and keeps the shards of one request on distinct replicas while
there are enough of them.
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

# A pick that routing never confirmed (the replica could not take the call) stops counting then.
_PICK_TTL_S = 10.0


@dataclass(frozen=True)
class _Pick:
    """The replica chosen for a call that is not yet routed."""

    pending: PendingRequest
    replica_id: ReplicaID
    at: float


class RenderCallRouter(FIFOMixin, RequestRouter):  # type: ignore[misc]
    """Least busy replica first; one that already has a call of the same request comes after.

    A replica's calls are what this router sent there and has not seen end, counted from the
    moment it picks the replica (calls routed in one burst would otherwise all see the same idle
    replica), or the replica's own count as Ray Serve last heard it, whichever is more (that one
    includes other routers' calls, but is forgotten after a few seconds without news). The calls
    of one request share Ray Serve's internal request id (they are made while serving one HTTP
    request), which is how they are recognised.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routed: Counter[tuple[str, ReplicaID]] = Counter()
        """Calls routed and not yet ended, by (internal request id, replica)."""
        self._picks: dict[int, _Pick] = {}
        """Calls not yet routed, by the id() of their pending request (which the pick holds)."""

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

        def preference(replica: RunningReplica) -> tuple[bool, int, int, str]:
            heard = self.replica_queue_len_cache.get(replica.replica_id) or 0
            load = max(calls[replica.replica_id], heard)
            return (
                load >= replica.max_ongoing_requests,
                of_request[replica.replica_id],
                load,
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
        """Count the call against its replica until it ends."""
        self._picks.pop(id(pending_request), None)
        self._routed[pending_request.metadata.internal_request_id, replica_id] += 1

    @override
    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A call ended (or was refused by a full replica): it no longer counts."""
        key = (internal_request_id, replica_id)
        self._routed[key] -= 1
        if self._routed[key] <= 0:
            del self._routed[key]
