"""How render calls find a FluxWorker replica.

A worker holds several render calls at once (its ``max_ongoing_requests``) and takes turns between
them, so where a call lands decides how many GPUs a request gets. Ray Serve's default router
compares two replicas picked at random: the shards of one request (``gpus`` > 1) could share a
replica while another idles, and then take turns on one GPU. This router sends each call to the
replica with the fewest calls, and keeps the shards of one request on distinct replicas while
there are enough of them.
"""

from __future__ import annotations

from collections import Counter
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


class RenderCallRouter(FIFOMixin, RequestRouter):  # type: ignore[misc]
    """Least busy replica first; one that already runs a shard of the request comes after.

    The shards of a request share Ray Serve's internal request id (they are calls made while
    serving one HTTP request), which is how they are recognised. FIFO order keeps them
    interchangeable: whichever shard is oldest takes the replica chosen.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shards_on: Counter[tuple[str, ReplicaID]] = Counter()

    @override
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, best first."""
        request = pending_request.metadata.internal_request_id if pending_request else ""
        shard = int(pending_request.kwargs.get("shard", 0)) if pending_request else 0
        ordered = sorted(candidate_replicas, key=lambda replica: replica.replica_id.unique_id)

        def preference(position: int) -> tuple[bool, int, int, int]:
            replica = ordered[position]
            calls = self.replica_queue_len_cache.get(replica.replica_id) or 0
            return (
                calls >= replica.max_ongoing_requests,
                self._shards_on[request, replica.replica_id],
                calls,
                # Shards routed at the same moment see the same loads; starting each from its
                # own replica keeps them apart until the counts above catch up.
                (position - shard) % len(ordered),
            )

        return [[ordered[position]] for position in sorted(range(len(ordered)), key=preference)]

    @override
    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """Count the shard against its replica until it completes."""
        self._shards_on[pending_request.metadata.internal_request_id, replica_id] += 1

    @override
    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A shard ended (or was refused by a full replica): it no longer counts."""
        key = (internal_request_id, replica_id)
        self._shards_on[key] -= 1
        if self._shards_on[key] <= 0:
            del self._shards_on[key]
