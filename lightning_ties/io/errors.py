"""The error raised for files that cannot be read as checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt, unsafe to load or not understood.

    The message always names the file and says what to do.
    """


class UnsafeOutputError(ValueError):
    """An output path would overwrite or delete an input, or files lightning-ties did not write.

    The message names the output, the input or foreign file at stake, and what to do.
    """


class OutputWriteError(OSError):
    """Writing an output failed (disk full, file size limit, permissions, I/O error).

    Carries the original ``errno``; the message names the output path. Nothing is left at
    the path (an earlier version stays as it was) and the temporary file is closed and removed.
    """
