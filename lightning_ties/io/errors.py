"""The error raised for files that cannot be read as checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt, unsafe to load or not understood.

    The message always names the file and says what to do.
    """
