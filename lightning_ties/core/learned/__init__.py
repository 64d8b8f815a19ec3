"""The Lightning-free parts of learned merging coefficients (the module and ``learn_coefficients`` are in the shells).

:mod:`.groups` (which parameters share a coefficient), :mod:`.components` (each task's share of
the merge, stored compactly), :mod:`.objectives` (losses and the batch convention), :mod:`.data`
(the hold-out) and :mod:`.result` (:class:`~.result.LearnedMergeResult`, saving, model card, plot).
"""
