"""Test session wiring: each fixture family lives in its own plugin module."""

pytest_plugins = [
    "tests.audio_fixtures",
    "tests.model_fixtures",
    "tests.server_fixtures",
    "tests.s3_fixtures",
]
