"""The Lightning integration for the unified ``lightning`` package (``import lightning as L``).

The same classes as :mod:`lightning_ties.lightning` (which builds on ``pytorch_lightning``), built
on ``lightning.pytorch``: pass them to ``L.Trainer`` and ``lightning.pytorch.cli.LightningCLI``.
This package's ``__path__`` is the ``lightning/`` folder, so its modules are those files, loaded a
second time under this name (see ``lightning_ties/lightning/_compat.py``); nothing is copied.

Example:
    >>> import lightning as L
    >>> from lightning_ties.pytorch import TiesMerging
    >>> isinstance(TiesMerging(tasks={"a": "a.ckpt"}, task="b"), L.Callback)
    True
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "lightning")]

# Run the layer's own __init__ in this namespace: its relative imports resolve inside this package.
_INIT = Path(__path__[0]) / "__init__.py"
_DOC = __doc__
exec(compile(_INIT.read_text(), str(_INIT), "exec"), globals())  # noqa: S102 (our own file)
__doc__ = _DOC
