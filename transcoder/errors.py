"""The transcoder's exceptions.

Every error carries a stable ``code`` (the API and the job record show it) and says whether a retry could
succeed: bad audio never can, a crashed worker process can.
"""


class TranscoderError(Exception):
    """Base class of everything the transcoder raises."""

    code = "transcoder_error"
    retryable = True


class DecodeError(TranscoderError):
    """The input could not be decoded as audio."""

    code = "undecodable_audio"
    retryable = False


class NoAudioStream(DecodeError):
    """The container holds no audio stream (a video without sound, an image, ...)."""

    code = "no_audio_stream"


class EmptyAudio(DecodeError):
    """The input is empty or decodes to no samples."""

    code = "empty_audio"


class ModelError(TranscoderError):
    """A model is missing, malformed or could not be obtained."""

    code = "model_error"
    retryable = False


class ModelNotFound(ModelError):
    """No model of that name is installed or known."""

    code = "model_not_found"


class ModelFormatError(ModelError):
    """A model file or directory is not in the expected format."""

    code = "bad_model"


class DownloadError(ModelError):
    """A model download failed (network error, bad status)."""

    code = "download_failed"


class ChecksumMismatch(DownloadError):
    """A downloaded file does not match its published checksum."""

    code = "checksum_mismatch"


class WorkerCrashed(TranscoderError):
    """The pool process running the job died (segfault, OOM kill); the job can run again elsewhere."""

    code = "worker_crashed"


class Aborted(TranscoderError):
    """The transcription was stopped through its abort callback (cancel, timeout, lost ownership)."""

    code = "aborted"
