"""v2t-node: a distributed speech-to-text service (whisper.cpp workers on a Redis Streams queue)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("v2t-node")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
