"""Audio decoding, the whisper.cpp process pool, transcript formats and the model registry."""
