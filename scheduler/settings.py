"""The scheduler's configuration (the ``[jobs]`` section), with its constraints in the types."""

from typing import Annotated

import msgspec

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class JobSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Retry, timeout, heartbeat and retention policy of the work stream."""

    #: Attempts before a job is ``failed``; a reclaimed entry counts as an attempt.
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 3
    #: Delay before the first retry; doubled each time up to ``retry_max``.
    retry_initial: Seconds = 1.0
    retry_factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    retry_max: Seconds = 60.0
    #: How often a running job's owner proves it is alive (and writes progress, and looks for cancellation).
    heartbeat_interval: Seconds = 1.0
    #: An entry idle this long is taken over by another node (its owner is presumed dead).
    heartbeat_timeout: Seconds = 30.0
    #: How often every node looks for such entries, and for delayed retries that are due.
    reclaim_interval: Seconds = 5.0
    #: Limit of one attempt; past it the attempt is aborted and retried.
    attempt_timeout: Seconds = 1800.0
    #: Limit of a whole job from submission; past it the job fails.
    job_timeout: Seconds = 7200.0
    #: How long finished job records and the result cache are kept.
    result_ttl: Seconds = 7 * 86400.0
    #: How long an ``Idempotency-Key`` maps to its job.
    idempotency_ttl: Seconds = 86400.0
    #: On shutdown, how long running jobs may take to finish before they are handed back to the queue.
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] = 30.0

    def retry_delay(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1``, ``attempt`` >= 1."""
        return min(self.retry_max, self.retry_initial * self.retry_factor ** (attempt - 1))
