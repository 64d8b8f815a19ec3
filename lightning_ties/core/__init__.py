"""The merge core: everything a merge in Lightning needs that does not import Lightning.

Loaded once for both Lightning packages, so each concept is one class: a ``SearchResult`` from a
``lightning.pytorch`` run is a ``SearchResult`` to ``pytorch_lightning`` code, and
``except KeyMatchError`` catches it whichever shell raised it. The shells
(:mod:`lightning_ties.pytorch`, :mod:`lightning_ties.pytorch_lightning`) add only what must
subclass a package's ``Callback`` / ``LightningModule``.

- :mod:`.merger`: :class:`~.merger.Merger`, the merge of task checkpoints into a model: sources
  matched (:mod:`.matching`, :mod:`.keys`), plan, heads (:mod:`.heads`), tau_m per (method, k),
  apply, per-task weights and heads, dataloader checks, a plain scoring loop, the search loop;
- :mod:`.options`: :class:`~.options.SearchOptions`, checked once at the public entry points;
- :mod:`.search`: the grid walks and :class:`~.search.SearchResult`; :mod:`.progress` shows a
  running search, :mod:`.resume` keeps its progress between runs;
- :mod:`.metrics`: per-task metrics, summaries and objectives;
- :mod:`.regmean`: RegMean's data pass over a merger's tasks;
- :mod:`.base_state`, :mod:`.recipe`: the fit-end merge's base (captured, referenced by file)
  and what it does with the validation data it has;
- :mod:`.learned`: the Lightning-free parts of learned coefficients (groups, components,
  objectives, hold-out data, the result).
"""
