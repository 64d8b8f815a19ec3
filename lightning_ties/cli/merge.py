"""``lightning-ties merge``: merge checkpoint files into one output with the I/O layer's streaming ``merge_to``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import MergeConfig
from ..io import merge_to
from ..io.ranks import process_rank
from .common import RESOLVED_CONFIG, Console, check_output_file, check_paths, method_args, save_resolved_config


def config_sidecar(cfg: MergeConfig) -> Path:
    """Where the resolved config goes: inside a folder output, else ``<output>.config.yaml`` beside it."""
    out = Path(cfg.output)
    # merge_to's rule: an explicit output_format, else the suffix, else a folder
    fmt = cfg.output_format or {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(out.suffix, "folder")
    return out / RESOLVED_CONFIG if str(fmt) == "folder" else out.with_name(out.name + ".config.yaml")


def run_merge(cfg: MergeConfig, console: Console) -> int:
    """Merge ``cfg.models`` onto ``cfg.base`` into ``cfg.output``; write the resolved config beside it.

    Under ``torchrun`` every rank runs this and merges its share; rank 0 writes the config and reports.
    """
    check_paths(cfg)
    config_path = config_sidecar(cfg)
    if config_path.parent != Path(cfg.output):  # inside a folder output it is part of the new folder
        check_output_file(config_path, cfg.overwrite, "output")
    name, lam, params = method_args(cfg.method)
    t0 = time.perf_counter()
    report = merge_to(
        cfg.output,
        cfg.base,
        list(cfg.models),
        name,
        lam,
        include=cfg.include,
        exclude=cfg.exclude,
        common_rows=cfg.common_rows,
        on_mismatch=str(cfg.on_mismatch),  # type: ignore[arg-type]
        output_format=None if cfg.output_format is None else str(cfg.output_format),  # type: ignore[arg-type]
        max_shard_size=cfg.max_shard_size,
        prefix=cfg.prefix,
        trust_pickle=cfg.trust_pickle,
        progress=None if not console.quiet else False,
        overwrite=cfg.overwrite,
        compute_dtype=getattr(torch, str(cfg.compute_dtype)),
        **params,
    )
    if process_rank() != 0:  # under torchrun every rank merges its part; rank 0 reports it
        return 0
    out = Path(cfg.output)
    save_resolved_config(cfg, config_path, overwrite=cfg.overwrite or config_path.parent == out)
    print(
        f"merged {len(cfg.models)} model(s) with {name} (lam={report.lam}) into {out} "
        f"in {time.perf_counter() - t0:.1f}s: "
        f"{len(report.merged_keys)} keys merged, {len(report.skipped)} taken from base; config: {config_path}"
    )
    return 0
