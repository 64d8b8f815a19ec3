"""The offline demo: a multitask suite built from scikit-learn's handwritten digits (no download).

``lightning-ties demo`` runs :func:`run_demo` with :class:`~lightning_ties.config.DemoConfig`.

Example:
    >>> from lightning_ties.demo import DEFAULT_TASKS
    >>> DEFAULT_TASKS
    ('digit', 'parity', 'ge5', 'mod3', 'loop')
"""

from .data import DEFAULT_TASKS, SOURCE_TASK, DigitsSuite, DigitsTask, dataloaders
from .models import HEAD_PATTERN, DigitsNet

__all__ = [
    "DEFAULT_TASKS",
    "HEAD_PATTERN",
    "SOURCE_TASK",
    "DigitsNet",
    "DigitsSuite",
    "DigitsTask",
    "dataloaders",
]
