"""What the ownership rule costs: writing and replacing outputs now that every file is hashed.

Each file lightning-ties writes is hashed (sha256) into its folder's manifest, and replacing an
output hashes the old one first (once per process: the checks before the work and under the lock
share the digest). This times ``save_safetensors`` and ``save_hf_folder`` of ``--mib`` MiB of
float32: a new output, then two replacements of it (``overwrite=True``), each in this process.

Run it against this tree and against a checkout from before issue 18 to compare, on one machine::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ownership.py --mib 512
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/bench_ownership.py --mib 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lightning_ties.io import save_hf_folder, save_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the state dict written (float32)")
    parser.add_argument("--repeats", type=int, default=3, help="writes per sink: one new, then replacements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = {f"w{i}": torch.randn(256, 1024) for i in range(args.mib)}  # 1 MiB each
    with tempfile.TemporaryDirectory() as folder:
        for name, write in (
            ("save_safetensors", lambda p: save_safetensors(state, p / "m.safetensors", overwrite=True)),
            ("save_hf_folder", lambda p: save_hf_folder(state, p / "model", overwrite=True)),
        ):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                write(Path(folder))
                times.append(time.perf_counter() - start)
            print(f"{name:17s} {args.mib} MiB: new {times[0]:.2f} s, replacing " + ", ".join(f"{t:.2f}" for t in times[1:]) + " s")


if __name__ == "__main__":
    main()
