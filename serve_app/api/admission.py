"""Admission control: a bound on the requests one ingress replica works on at once."""

from __future__ import annotations

from serve_app.faults import Overloaded


class Slot:
    """One admitted request's place; releasing it twice is harmless. As a context manager, it is
    released when the block ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.active -= 1

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Admission:
    """Admits up to ``limit`` requests at once and refuses the next one immediately, rather than
    queueing without end while clients time out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def admit(self) -> Slot:
        """A slot for one request, or Overloaded when all are taken."""
        if self.active >= self.limit:
            raise Overloaded(f"the service is at capacity ({self.limit} requests in progress)")
        self.active += 1
        return Slot(self)
