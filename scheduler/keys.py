"""Every Redis key the cluster uses, in one place, all under one prefix (default ``v2t:``)."""

import hashlib

#: The consumer group all nodes read the work stream with.
GROUP = "workers"


class Keys:
    """Key names under ``prefix``."""

    def __init__(self, prefix: str = "v2t:") -> None:
        self.prefix = prefix
        #: The work stream: one entry per attempt to run a job (field ``job`` = job id).
        self.stream = f"{prefix}stream"
        #: Sorted set of job ids by creation time (ms), for listing.
        self.index = f"{prefix}jobs"
        #: Sorted set of job ids waiting for a delayed retry, scored by due time (ms).
        self.retry = f"{prefix}retry"
        #: Prefix of job hashes; the scripts build ``job:<id>`` keys from it.
        self.job_prefix = f"{prefix}job:"

    def job(self, job_id: str) -> str:
        """The hash holding one job's record."""
        return f"{self.job_prefix}{job_id}"

    def idempotency(self, key: str) -> str:
        """Maps a client's ``Idempotency-Key`` to the job it created."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}idem:{digest}"

    def result(self, sha256: str, model: str, options: str) -> str:
        """The result cache: (audio digest, model, decode options) -> id of the job holding the transcript."""
        return f"{self.prefix}result:{sha256}:{model}:{options}"

    def node(self, node_id: str) -> str:
        """A node's membership record (expires unless refreshed)."""
        return f"{self.prefix}node:{node_id}"

    def __repr__(self) -> str:
        return f"Keys(prefix={self.prefix!r})"
