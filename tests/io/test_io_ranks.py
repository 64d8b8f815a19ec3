"""merge_to on W processes (torchrun, gloo): the same files, byte for byte, as one process; a failure leaves nothing."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_ties.io.ownership import MANIFEST
from lightning_ties.cli.main import main
from lightning_ties.io import SafetensorsWriter, merge_to
from lightning_ties.io.ranks import Layout, PartWriter, assign_keys, create_layout
from lightning_ties.merging.sources import TensorSpec

TESTS = Path(__file__).parents[1]
ROOT = TESTS.parent
SCRIPT = TESTS / "distributed_merge_script.py"
# Several shards at this size (the models are ~1.3 MB of float32 each).
SHARD = "300KB"


def shapes() -> dict[str, tuple[int, ...]]:
    found = {"embed.weight": (1000, 64)}
    for layer in range(4):
        for name, shape in (("attn.weight", (64, 192)), ("attn.bias", (192,)), ("mlp.up", (256, 64)), ("mlp.down", (64, 256))):
            found[f"layers.{layer}.{name}"] = shape
    found["norm.weight"] = (64,)
    found["step"] = (1,)  # an integer buffer: copied from base
    return found


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base folder (with config.json) and three fine-tuned folders.

    Values are multiples of 2**-10 and task vectors small integers of it: many entries tie at
    the global threshold and many sign elections are exactly tied, the cases where ranks must
    agree on more than the threshold.
    """
    root = tmp_path_factory.mktemp("ranks_models")
    g = torch.Generator().manual_seed(0)
    base = {}
    for key, shape in shapes().items():
        base[key] = torch.arange(shape[0]).int() if key == "step" else torch.round(torch.randn(shape, generator=g) * 20) / 1024
    folders = [root / "base", *(root / f"ft{i}" for i in range(3))]
    for i, folder in enumerate(folders):
        folder.mkdir()
        delta = {k: torch.randint(-3, 4, v.shape, generator=g) / 1024 if v.is_floating_point() else 0 for k, v in base.items()}
        save_file({k: v + delta[k] if i else v for k, v in base.items()}, str(folder / "model.safetensors"))
    (folders[0] / "config.json").write_text('{"model_type": "toy"}\n')
    return folders[0], folders[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(world: int, args: list[str], tmp_path: Path, timeout: float = 90, timeout_s: int = 30) -> subprocess.CompletedProcess:
    return torchrun_hosts(1, world, args, tmp_path, timeout, timeout_s)[0]


def torchrun_hosts(hosts: int, per_host: int, args: list[str], tmp_path: Path, timeout: float = 90,
                   timeout_s: int = 30) -> list[subprocess.CompletedProcess]:
    """``torchrun`` on ``hosts`` launchers at once (``--nnodes``/``--node_rank``, as on several hosts sharing a
    file system; here all on this one), each starting ``per_host`` ranks; one result per launcher."""
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
        "LIGHTNING_TIES_DIST_TIMEOUT": str(timeout_s),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    port = free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_host}", f"--master_port={port}",
             *([f"--nnodes={hosts}", f"--node_rank={node}", "--master_addr=127.0.0.1"] if hosts > 1 else []), *args]
            for node in range(hosts)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                              start_new_session=True) for cmd in cmds]
    deadline = time.monotonic() + timeout
    results = []
    for cmd, proc in zip(cmds, procs):
        try:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in procs:  # every launcher and its workers: nothing outlives the test
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun did not finish within {timeout} s:\n{stderr[-4000:]}")
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


def run_jobs(world: int, jobs: list[dict], tmp_path: Path, init: bool = False, timeout_s: int = 30, **plan_keys):
    """Run the jobs on ``world`` ranks; ``plan_keys``: ``fail``, ``reads``, ``only`` (see the script)."""
    plan = tmp_path / f"plan-{world}.json"
    plan.write_text(json.dumps({"jobs": jobs, "init": init, **{k: str(v) if isinstance(v, Path) else v for k, v in plan_keys.items()}}))
    return torchrun(world, [str(SCRIPT), str(plan)], tmp_path, timeout_s=timeout_s)


def job(output: Path, models: tuple[Path, list[Path]], **kwargs) -> dict:
    base, fts = models
    return {"output": str(output), "base": str(base), "models": [str(m) for m in fts], "kwargs": kwargs}


def assert_identical(a: Path, b: Path) -> None:
    if a.is_file():
        assert filecmp.cmp(a, b, shallow=False), f"{a} and {b} differ"
        return
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert (mismatch, errors) == ([], []), f"differ: {mismatch} {errors}"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lightning-ties-" in p.name)


# ---- the pieces, in one process ------------------------------------------------------------------
def test_keys_are_split_into_contiguous_runs_balanced_by_cost_and_tied_names_go_together():
    # given costs 4, 4, 1, 7 (total 16) on two ranks: midpoints 2, 6, 8.5, 12.5 against the cut at 8
    assert assign_keys({"a": 4, "b": 4, "c": 1, "d": 7}, 2) == {"a": 0, "b": 0, "c": 1, "d": 1}
    # three ranks (cuts at 16/3, 32/3): b's midpoint 6 is past the first cut
    assert assign_keys({"a": 4, "b": 4, "c": 1, "d": 7}, 3) == {"a": 0, "b": 1, "c": 1, "d": 2}
    # a tied name (alias -> first) is written by its first name's rank
    assert assign_keys({"a": 4, "b": 4, "c": 1, "d": 7}, 2, together={"d": "a"})["d"] == 0
    # more ranks than keys: some ranks get nothing
    assert assign_keys({"a": 1, "b": 1}, 4) == {"a": 1, "b": 3}


def test_parts_written_by_several_writers_give_the_one_writer_file(tmp_path):
    specs = {"a": TensorSpec((3,), torch.float32), "b": TensorSpec((2, 2), torch.bfloat16), "c": TensorSpec((0,), torch.float32)}
    tensors = {"a": torch.tensor([1.0, -2.0, 3.0]), "b": torch.ones(2, 2, dtype=torch.bfloat16), "c": torch.zeros(0)}
    with SafetensorsWriter(tmp_path / "one.safetensors", specs, {"x": "y"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    layout: Layout = {"parts.safetensors": (specs, {"format": "pt", "x": "y"})}
    create_layout(tmp_path, layout)
    for mine in ({"b"}, {"a", "c"}):  # two ranks, in any order
        writer = PartWriter(tmp_path, layout, mine)
        for k in mine:
            writer.write(k, tensors[k])
        writer.close()
    assert filecmp.cmp(tmp_path / "one.safetensors", tmp_path / "parts.safetensors", shallow=False)
    with pytest.raises(ValueError, match="never written.*'a'"):
        PartWriter(tmp_path, layout, {"a"}).close()


# ---- W processes under torchrun ------------------------------------------------------------------
CASES = {
    "global_ties": dict(method="ties", k=0.3, lam=1.1, max_shard_size=SHARD),
    "per_tensor_ties": dict(method="ties", k=0.3, scope="per_tensor", max_shard_size=SHARD),
    "task_arithmetic": dict(method="task_arithmetic", lam=0.7),
    "dare_ties": dict(method="dare_ties", p=0.5),  # the global majority sign across ranks
    "ties_normfrac": dict(method="ties", k=0.3, sign="normfrac"),  # merged whole on every rank
    "tsv": dict(method="tsv"),  # an SVD per tensor, each tensor whole on its rank
}


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_merges_on_several_processes_equal_the_one_process_output_file_for_file(models, tmp_path, world):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    jobs = []
    for name, kwargs in CASES.items():
        merge_to(single / name, *models, progress=False, **kwargs)
        jobs.append(job(multi / name, models, **kwargs))
    # a single-file output: every rank writes its tensors into the one file
    merge_to(single / "ties.safetensors", *models, progress=False, k=0.2)
    jobs.append(job(multi / "ties.safetensors", models, k=0.2))

    # world 2: merge_to starts the group from torchrun's environment; world 3: it uses the script's
    # group, and reads every tensor over 1 KB into reused buffers
    proc = run_jobs(world, jobs, tmp_path, init=world == 3, **({"buffer_bytes": 1000} if world == 3 else {}))

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len([p for p in (single / "global_ties").iterdir() if p.suffix == ".safetensors"]) >= 3  # several shards
    for name in [*CASES, "ties.safetensors"]:
        assert_identical(single / name, multi / name)
    assert leftovers(multi) == []


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_each_rank_reads_only_the_tensors_it_writes_under_the_global_trim(models, tmp_path):
    from lightning_ties.io import open_source

    proc = run_jobs(2, [job(tmp_path / "out", models, k=0.3, max_shard_size=SHARD)], tmp_path, reads=tmp_path / "reads")

    assert proc.returncode == 0, proc.stderr[-4000:]
    read = [set(json.loads((tmp_path / f"reads.rank{r}.json").read_text())) for r in range(2)]
    merged = {k for k in open_source(models[0]).keys() if k != "step"}
    assert read[0] and read[1] and not read[0] & read[1]  # the work is split, no key read twice
    assert read[0] | read[1] == merged  # and the global threshold still saw every entry (identical output above)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_the_merge_command_under_torchrun_writes_what_one_process_writes(models, tmp_path):
    base, fts = models
    config = {
        "base": str(base), "models": [str(m) for m in fts], "output": str(tmp_path / "multi"),
        "method": {"name": "ties", "k": 0.25}, "max_shard_size": SHARD,
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "merge.yaml"), f"output={tmp_path / 'single'}", "--quiet"]) == 0

    proc = torchrun(2, ["-m", "lightning_ties", "merge", str(tmp_path / "merge.yaml")], tmp_path)

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("merged 3 model(s)") == 1  # rank 0 reports; the others stay quiet
    assert (tmp_path / "multi" / "config.yaml").is_file()  # the resolved config, written once
    manifests = []
    for run in ("single", "multi"):  # the resolved config names its own output, and the manifest lists its hash
        (tmp_path / run / "config.yaml").unlink()
        manifest = tmp_path / run / MANIFEST
        manifests.append(_without_config(json.loads(manifest.read_text())))
        manifest.unlink()
    assert manifests[0] == manifests[1]
    assert_identical(tmp_path / "single", tmp_path / "multi")


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_the_merge_command_on_two_hosts_sharing_a_file_system_writes_what_one_process_writes(models, tmp_path):
    # given the README's multi-host command: one launcher per host (here two on this one), one rank each, so the
    # second host's rank has LOCAL_RANK 0 and RANK 1
    base, fts = models
    config = {"base": str(base), "models": [str(m) for m in fts], "output": str(tmp_path / "multi"),
              "method": {"name": "ties", "k": 0.25}, "max_shard_size": SHARD}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "merge.yaml"), f"output={tmp_path / 'single'}", "--quiet"]) == 0
    # when both launchers run the same command
    hosts = torchrun_hosts(2, 1, ["-m", "lightning_ties", "merge", str(tmp_path / "merge.yaml")], tmp_path, timeout=120)
    # then both ranks merge their parts and rank 0 (host 0) alone reports and publishes the one-process output
    assert [h.returncode for h in hosts] == [0, 0], hosts[0].stderr[-3000:] + hosts[1].stderr[-3000:]
    assert [h.stdout.count("merged 3 model(s)") for h in hosts] == [1, 0]
    for run in ("single", "multi"):
        (tmp_path / run / "config.yaml").unlink()  # the resolved config names its own output
        (tmp_path / run / MANIFEST).unlink()
    assert_identical(tmp_path / "single", tmp_path / "multi")


def _without_config(manifest: dict) -> dict:
    """A manifest with the resolved config's entry dropped (its content names the output)."""
    return {key: ({k: v for k, v in value.items() if k != "config.yaml"} if isinstance(value, dict) else value)
            for key, value in manifest.items()}


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "world, fail",
    [
        (2, {"rank": 1, "how": "raise", "after": 2}),  # a disk-full error in the middle of rank 1's part
        (3, {"rank": 0, "how": "kill", "after": 2}),  # rank 0 (which holds the temporary) killed mid-merge
        (2, {"rank": 1, "how": "bad_file"}),  # rank 1 cannot read an input (a stale copy on its host)
    ],
)
def test_a_rank_failing_mid_merge_stops_every_rank_and_leaves_nothing(models, tmp_path, world, fail):
    out = tmp_path / "out"
    out.mkdir()
    jobs = [job(out / "merged", models, k=0.3, max_shard_size=SHARD), job(out / "merged.safetensors", models, k=0.3)]
    start = time.monotonic()

    proc = run_jobs(world, jobs[:1] if fail["how"] == "kill" else jobs[1:], tmp_path, fail=fail)

    assert proc.returncode != 0
    assert time.monotonic() - start < 60  # nobody waited for a timeout
    assert sorted(os.listdir(out)) == []  # no output, no temporary
    if fail["how"] == "raise":
        assert f"[rank1]: lightning_ties.io.errors.OutputWriteError: [Errno 28] cannot write {out / 'merged.safetensors'}: No space left on device (injected)" in proc.stderr
        assert "RankFailedError" in proc.stderr  # the other rank stopped with the peer's failure
    if fail["how"] == "bad_file":  # before the merge: rank 0 says which rank failed, and why
        assert "[rank0]: lightning_ties.io.ranks.RankFailedError: rank 1 failed while checking the inputs" in proc.stderr
        assert "corrupt header (injected on rank 1)" in proc.stderr


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_call_on_one_rank_of_a_job_merges_alone_with_distributed_false_and_otherwise_says_what_to_do(models, tmp_path):
    merge_to(tmp_path / "single", *models, progress=False, k=0.3)
    jobs = [job(tmp_path / "alone", models, k=0.3, distributed=False), job(tmp_path / "auto", models, k=0.3)]

    proc = run_jobs(2, jobs, tmp_path, init=True, only=0, timeout_s=5)  # rank 1 never calls merge_to

    assert_identical(tmp_path / "single", tmp_path / "alone")
    assert proc.returncode != 0 and not (tmp_path / "auto").exists()
    assert "call merge_to on every rank, or pass distributed=False" in proc.stderr


def test_one_torch_collectives_serves_merge_to_and_the_sharded_fit():
    from lightning_ties.distributed import TorchCollectives as sharded_fits
    from lightning_ties.io.ranks import TorchCollectives as merge_to_ranks

    assert sharded_fits is merge_to_ranks


@pytest.fixture(scope="module")
def tie_models(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    """Per dtype (float32, bf16 files), a zero base and three models of magnitudes ``(1 + j/128) / 16``.

    Thousands of exact ties at every threshold, on a grid narrow enough for the sampled bracket:
    the global trim's ties are then shared out from each rank's bracket counts.
    """
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp(f"tie_models_{str(dtype)[6:]}")
        g = torch.Generator().manual_seed(1)
        base = {key: torch.zeros(shape, dtype=dtype) for key, shape in shapes().items() if key != "step"}
        folders = [root / "base", *(root / f"ft{i}" for i in range(3))]
        for i, folder in enumerate(folders):
            folder.mkdir()
            tensors = dict(base)
            if i:
                for key, b in base.items():
                    magnitude = (1 + torch.randint(0, 12, b.shape, generator=g) / 128) / 16
                    tensors[key] = (magnitude * (torch.rand(b.shape, generator=g) - 0.5).sign()).to(dtype)
            save_file(tensors, str(folder / "model.safetensors"))
        found[str(dtype)[6:]] = (folders[0], folders[1:])
    return found


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_threshold_ties_shared_from_each_rank_s_bracket_counts_give_the_one_process_output(tie_models, tmp_path, world):
    # given inputs full of exact ties at the thresholds (float32 and bf16 files), k values whose
    # thresholds keep part of their ties, and the sampled bracket on (as on large models)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    jobs = []
    for dtype, models in tie_models.items():
        for k in (0.2, 0.5, 0.8):
            name = f"{dtype}-{k}"
            merge_to(single / name, *models, progress=False, k=k, max_shard_size=SHARD)
            jobs.append(job(multi / name, models, k=k, max_shard_size=SHARD))

    # when the ranks merge their runs of whole tensors
    proc = run_jobs(world, jobs, tmp_path, bracket=[1000, 4096], ties=tmp_path / "ties")

    # then every merge shared its ties from the bracket counts, and the files are the one process's
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(world):
        assert json.loads((tmp_path / f"ties.rank{r}.json").read_text()) == [True] * len(jobs)
    for name in (p.name for p in single.iterdir()):
        assert_identical(single / name, multi / name)
    assert leftovers(multi) == []


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world, shard", [(2, SHARD), (3, SHARD), (2, "5GB")])
def test_the_ranks_hash_the_files_they_wrote_and_publishing_reads_none_again(models, tmp_path, world, shard):
    # given a folder output of several shard files (or one file every rank writes part of)
    merge_to(tmp_path / "single", *models, progress=False, k=0.3, max_shard_size=shard)
    # when the ranks merge it
    proc = run_jobs(world, [job(tmp_path / "multi", models, k=0.3, max_shard_size=shard)], tmp_path, rehashed=tmp_path / "rehashed")
    # then the manifest lists the one process's digests, and none was computed by reading a file again
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_identical(tmp_path / "single", tmp_path / "multi")  # the manifest included
    assert json.loads((tmp_path / "rehashed.rank0.json").read_text()) == []


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_an_fp16_overflow_on_one_rank_is_refused_on_every_rank_as_one_process_refuses_it(tmp_path):
    # the last tensor overflows float16 at lam=2: on two ranks it is rank 1's (the one-process
    # writers refused it; the ranks' writer wrote inf)
    big = 60000.0
    base = {f"layers.{i}.w": torch.full((64, 64), 1.0) for i in range(4)} | {"layers.4.w": torch.tensor([big, 1.0])}
    ft = {k: v + 4000.0 if k == "layers.4.w" else v + 0.5 for k, v in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({k: v.half() for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    models = (tmp_path / "base", [tmp_path / "ft"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OverflowError, match="tensor 'layers.4.w' has 1 inf/NaN"):
        merge_to(out / "one", *models, "task_arithmetic", lam=2.0, progress=False)

    proc = run_jobs(2, [job(out / "merged", models, method="task_arithmetic", lam=2.0)], tmp_path)

    assert proc.returncode != 0
    assert sorted(os.listdir(out)) == []  # no output, no temporary
    assert f"[rank1]: OverflowError: {out / 'merged'}: tensor 'layers.4.w' has 1 inf/NaN value(s) in torch.float16" in proc.stderr
    assert "[rank0]: lightning_ties.io.ranks.RankFailedError" in proc.stderr
