"""DDP on CPU (2 processes, gloo): the search picks what one process picks and every rank holds the same weights
(the module's model built, or given as a factory and filled from the base on each rank: the same)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    '''
    import json, os, sys, warnings
    sys.path.insert(0, sys.argv[3])
    warnings.filterwarnings("ignore")
    sync_warnings = []
    warnings.filterwarnings("always", message=".*sync_dist.*")
    warnings.showwarning = lambda message, *rest: sync_warnings.append(str(message))
    import torch
    import pytorch_lightning as pl
    from conftest import QUIET, fine_tune, pretrained, task_data
    from lightning_ties import MultiTaskMergeModule, TiesMerging

    devices, out = int(sys.argv[1]), sys.argv[2]
    strategy = "ddp" if devices > 1 else "auto"
    trainer_args = {**QUIET, "devices": devices, "strategy": strategy}
    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    g = torch.Generator().manual_seed(7)
    # fine-tuned stand-ins built without training, identical on every rank
    tasks = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    loaders = {"a": task_data(1, n=96, batch_size=16), "b": task_data(2, n=96, batch_size=16)}

    # 1. no training: merge and search
    module = MultiTaskMergeModule(pretrained(), tasks)
    result = module.search(pl.Trainer(**trainer_args), loaders, k=[0.1, 0.3], lam=[0.6, 1.0, 1.4])
    # the same with model= a factory: built on the meta device, filled whole from the base on each rank
    lazy = MultiTaskMergeModule(base, tasks, model=pretrained)
    lazy_result = lazy.search(pl.Trainer(**trainer_args), loaders, k=[0.1, 0.3], lam=[0.6, 1.0, 1.4])

    # 2. the callback at fit end (task c trains here)
    torch.manual_seed(3)
    merging = TiesMerging(tasks=tasks, task="c", k=0.2, lam=[0.8, 1.2], val_dataloaders=loaders, every_n_val_epochs=1)
    model = pretrained()
    pl.Trainer(max_epochs=1, callbacks=[merging], **trainer_args).fit(model, task_data(3, n=96, batch_size=16),
                                                                        task_data(3, n=96, batch_size=16))
    rank = int(os.environ.get("LOCAL_RANK", 0))
    record = {
        "search": [result.k, result.lam, [c.objective for c in result.candidates]],
        "search_weights": sum(float(v.double().sum()) for v in module.model.state_dict().values()),
        "lazy_search": [lazy_result.k, lazy_result.lam, [c.objective for c in lazy_result.candidates]],
        "lazy_weights": sum(float(v.double().sum()) for v in lazy.model.state_dict().values()),
        "fit": [merging.result.k, merging.result.lam, [c.objective for c in merging.result.candidates]],
        "fit_weights": sum(float(v.double().sum()) for v in model.state_dict().values()),
        "sync_warnings": [w for w in sync_warnings if "merge/" in w or "finetuned/" in w],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    '''
)


def run(devices: int, out: Path, script: Path) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    tests_dir = str(Path(__file__).resolve().parents[1])  # where conftest.py is
    proc = subprocess.run(
        [sys.executable, str(script), str(devices), str(out), tests_dir],
        capture_output=True, text=True, timeout=300, env=env, cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_ddp_search_and_fit_end_merge_match_a_single_process(tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    (single,) = run(1, tmp_path / "single", script)
    ranks = run(2, tmp_path / "ddp", script)
    for rank in ranks:
        assert rank["search"][:2] == single["search"][:2]
        assert rank["search"][2] == pytest.approx(single["search"][2], abs=1e-6)  # metrics reduced across ranks
        assert rank["search_weights"] == ranks[0]["search_weights"]  # every rank holds the same merge
        assert rank["lazy_search"] == rank["search"] and rank["lazy_weights"] == rank["search_weights"]
        assert rank["fit"] == ranks[0]["fit"] and rank["fit_weights"] == ranks[0]["fit_weights"]
    assert ranks[0]["search_weights"] == pytest.approx(single["search_weights"], rel=1e-6)
    assert ranks[0]["sync_warnings"] == []  # issue 19: our own merge/... logs do not ask for sync_dist
