"""The ``lightning-ties`` command: ``merge``, ``search``, ``evaluate`` and ``demo``, driven by YAML configs.

Every subcommand takes a config file (the demo has an embedded default) and ``key=value``
overrides (omegaconf dotlist), checks the whole config before any work, writes the fully
resolved config next to its outputs, and exits non-zero with one line on bad input (the
traceback only with ``--debug``).

One module per workflow (:mod:`.merge`, :mod:`.search`, :mod:`.evaluate`, :mod:`.demo`); the
parser and the error handling are in :mod:`.main`; what they share is in :mod:`.common` (no
Lightning) and :mod:`.runs` (Lightning). The library code they run lives in the layers below:
:mod:`lightning_ties.lightning.scoring` scores models per task, :mod:`lightning_ties.evaluation`
holds the batch convention and the accuracy.

Example (the same as ``lightning-ties demo --fast --quiet methods=[ties]`` in a shell)::

    from lightning_ties.cli import main
    exit_code = main(["demo", "--fast", "--quiet", "methods=[ties]", "output_dir=runs/demo-fast"])
"""

from .main import PROG, build_parser, dispatch, main, one_line

__all__ = ["PROG", "build_parser", "dispatch", "main", "one_line"]
