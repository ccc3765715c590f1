"""`--on-storage-error open|closed`: what a decision answers when its storage cannot."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar, cast

from ratelimit.counters import Commit, Decision, Reservation, StorageError
from ratelimit.storage.base import CounterSet, Storage, StorageWrapper

logger = logging.getLogger(__name__)

T = TypeVar("T")

OnStorageError = Literal["open", "closed"]
"""The `--on-storage-error` modes."""


class FailureMode(StorageWrapper):
    """`--on-storage-error open|closed` around any storage.

    closed: a StorageError reaches the server, which answers HTTP 503 / gRPC UNAVAILABLE, and the
            service is not ready (`/ready` 503, gRPC health NOT_SERVING) while the storage is not.
    open:   the request is admitted (nothing is charged: the storage could not count it); always ready.
    Either way the failure is counted in `status.decision_errors` and logged once when the storage
    starts failing and once, with the count, when it answers again. Listing counters is not a
    decision and always raises.
    """

    def __init__(self, storage: Storage, mode: OnStorageError) -> None:
        if mode not in ("open", "closed"):
            raise ValueError(f"on storage error must be open or closed, got {mode!r}")
        super().__init__(storage)
        self.mode = mode
        self._failed_since_recovery = 0

    def ready(self) -> bool:
        return self.mode == "open" or self.storage.ready()

    async def around(self, decision: Awaitable[T]) -> T:
        # check_and_update, is_within_limits and update_counters answer a Decision; the
        # decisions with other answers are overridden below.
        return await self._answer(decision, lambda: cast(T, Decision()))

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        # Admitted open, the reservation holds nothing; its commit will find it not held.
        return await self._answer(
            self.storage.reserve(counters, amount, ttl_seconds), lambda: Reservation(None, [], uuid.uuid4().hex)
        )

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        return await self._answer(self.storage.commit(reservation_id, counters, actual), lambda: Commit(False))

    async def _answer(self, call: Awaitable[T], admitted: Callable[[], T]) -> T:
        """The storage's answer; when it fails, `admitted()` (open) or the error (closed)."""
        try:
            answer = await call
        except StorageError as exc:
            self._failed(exc)
            return admitted()
        self._recovered()
        return answer

    def _failed(self, error: StorageError) -> None:
        """Count the failure, log the first of an outage; closed re-raises it, open lets the caller admit."""
        self.status.decision_errors += 1
        if not self._failed_since_recovery:
            logger.error("counter storage failing, answering %s: %s",
                         "within limits (open)" if self.mode == "open" else "unavailable (closed)", error)
        self._failed_since_recovery += 1
        if self.mode == "closed":
            raise error

    def _recovered(self) -> None:
        if self._failed_since_recovery:
            logger.error("counter storage answering again after %d failed decisions", self._failed_since_recovery)
            self._failed_since_recovery = 0
