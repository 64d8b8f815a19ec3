"""Checkpoints in, merged model out (filled in by the I/O work)."""

__all__: list[str] = []
