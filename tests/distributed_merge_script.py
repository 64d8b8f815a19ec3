"""Run by test_io_ranks.py under torchrun: the merge_to calls a JSON file lists, with an optional injected failure.

    python -m torch.distributed.run --nproc_per_node=W tests/distributed_merge_script.py plan.json

plan.json: ``{"init": bool, "jobs": [{"output", "base", "models", "kwargs"}], "fail": {"rank", "how", "after"}}``.
``init``: the script starts the process group itself (merge_to then uses it); otherwise merge_to
starts one from the launcher's environment. ``fail``: on that rank, the ``after``-th tensor
written fails with ENOSPC (``how="raise"``, a rank other than 0) or kills the process
(``how="kill"``), or every file it opens is corrupt (``how="bad_file"``). ``only``: the one rank that
runs the jobs. ``reads``: each rank writes the keys it read from the fine-tuned models to ``<reads>.rank<r>.json``.
``buffer_bytes``: read tensors over this size into reused buffers (stream._REUSED_BUFFER_BYTES).
``bracket``: ``[min_bracketed, sample_size]``, the global trim's sampled bracket on these small models.
``ties``: each rank writes to ``<ties>.rank<r>.json`` whether its threshold ties were shared out from
its bracket counts (true) or counted by reading (false), per merge that had ties to share.
``rehashed``: each rank writes to ``<rehashed>.rank<r>.json`` the output ``.safetensors`` files whose
sha256 the manifest had to compute by reading them (not one the ranks had hashed already).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from lightning_ties.io import merge_to, ranks, stream
from lightning_ties.merging import thresholds

plan = json.loads(Path(sys.argv[1]).read_text())
rank = int(os.environ["RANK"])
if plan.get("init"):
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))

fail = plan.get("fail")
if fail and fail["rank"] == rank and fail["how"] == "bad_file":
    from lightning_ties.io import CheckpointError

    def unreadable(path, **kwargs):
        raise CheckpointError(f"{path}: corrupt header (injected on rank {rank})")

    stream.open_source = unreadable
elif fail and fail["rank"] == rank and fail["how"] == "kill":
    write, written = ranks.PartWriter.write, []

    def killing_write(self, key, tensor):
        written.append(key)
        if len(written) == fail["after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, key, tensor)

    ranks.PartWriter.write = killing_write
elif fail and fail["rank"] == rank:
    pwrite_all, written = ranks._pwrite_all, []

    def failing_pwrite_all(fd, data, offset):  # rank != 0: only its tensors' writes
        written.append(offset)
        if len(written) == fail["after"]:
            raise OSError(28, "No space left on device (injected)")
        pwrite_all(fd, data, offset)

    ranks._pwrite_all = failing_pwrite_all

read: set[str] = set()
if plan.get("reads"):
    get = stream.RecentTensorCache.get

    def recording_get(self, key):
        if self.label != plan["jobs"][0]["base"]:
            read.add(key)
        return get(self, key)

    stream.RecentTensorCache.get = recording_get

if plan.get("buffer_bytes"):
    stream._REUSED_BUFFER_BYTES = plan["buffer_bytes"]
if plan.get("bracket"):
    thresholds._MIN_BRACKETED, thresholds._SAMPLE = plan["bracket"]
from_counts: list[bool] = []
if plan.get("ties"):
    run_budgets = thresholds.ThresholdFinder._run_budgets

    def recording_run_budgets(self, *args):
        budgets = run_budgets(self, *args)
        from_counts.append(budgets is not None)
        return budgets

    thresholds.ThresholdFinder._run_budgets = recording_run_budgets

rehashed: list[str] = []
if plan.get("rehashed"):
    from lightning_ties.io import ownership

    digest = ownership.digest

    def spying_digest(path):
        if not isinstance(path, int) and str(path).endswith(".safetensors"):
            fd = os.open(path, os.O_RDONLY)
            try:
                known = ownership.file_identity(fd) in ownership._DIGESTS
            finally:
                os.close(fd)
            if not known:
                rehashed.append(Path(path).name)
        return digest(path)

    ownership.digest = spying_digest

for job in plan["jobs"] if plan.get("only") in (None, rank) else []:
    merge_to(job["output"], job["base"], job["models"], progress=False, **job["kwargs"])
if plan.get("init"):
    dist.barrier()
    dist.destroy_process_group()
if plan.get("reads"):
    Path(f"{plan['reads']}.rank{rank}.json").write_text(json.dumps(sorted(read)))
if plan.get("ties"):
    Path(f"{plan['ties']}.rank{rank}.json").write_text(json.dumps(from_counts))
if plan.get("rehashed"):
    Path(f"{plan['rehashed']}.rank{rank}.json").write_text(json.dumps(rehashed))
