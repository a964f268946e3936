"""The scheduler's exceptions; each has a stable ``code`` and the HTTP status the API answers with."""


class SchedulerError(Exception):
    """Base class of everything the scheduler raises."""

    code = "scheduler_error"
    status = 500


class JobNotFound(SchedulerError):
    """No job has that id (or its record has expired)."""

    code = "job_not_found"
    status = 404


class JobConflict(SchedulerError):
    """The job is in a state that does not allow the operation (e.g. cancel a finished job)."""

    code = "job_conflict"
    status = 409


class TranscriptNotReady(JobConflict):
    """The job has not completed, so there is no transcript yet."""

    code = "transcript_not_ready"


class InvalidJob(SchedulerError):
    """The submission itself is malformed (bad id, unknown option)."""

    code = "invalid_job"
    status = 400


class QueueUnavailable(SchedulerError):
    """The Redis server cannot be reached."""

    code = "queue_unavailable"
    status = 503
