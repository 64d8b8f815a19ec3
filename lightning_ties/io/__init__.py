"""Checkpoints in, merged model out: lazy file sources, atomic sinks and the streaming merge.

Importing this package lets every merge function take paths: ``ties_merge("base/", ["a.ckpt",
"b.safetensors"])`` opens them with :func:`open_source`.

Example:
    >>> import tempfile, torch
    >>> from lightning_ties import ties_merge
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_safetensors({"w": torch.zeros(2)}, folder + "/base.safetensors")
    >>> _ = save_safetensors({"w": torch.tensor([1.0, -3.0])}, folder + "/ft.safetensors")
    >>> ties_merge(folder + "/base.safetensors", [folder + "/ft.safetensors"], k=0.5)["w"]
    tensor([ 0., -3.])
"""

from ..merging import register_path_opener
from .atomic import atomic_dir, atomic_file, atomic_open
from .card import build_model_card
from .digests import sha256_file
from .errors import CheckpointError
from .lora import LoraSource
from .lora_adapter import LoraMergeReport, merge_lora_adapters
from .safetensors_file import SafetensorsFile, SafetensorsWriter
from .hf_folder import parse_size
from .sinks import (
    LoadReport,
    ShardedWriter,
    load_into,
    save_hf_folder,
    save_lightning_checkpoint,
    save_safetensors,
)
from .formats import open_source
from .readers import SafetensorsSource, TorchFileSource, load_torch_file
from .stream import merge_to
from .task_store import TaskVectorSource, TaskVectorStore
from .validate import CommonRowsSource, MergeInputError, check_compatible

register_path_opener(open_source)

__all__ = [
    "CheckpointError",
    "CommonRowsSource",
    "LoadReport",
    "LoraMergeReport",
    "LoraSource",
    "MergeInputError",
    "SafetensorsFile",
    "SafetensorsSource",
    "SafetensorsWriter",
    "ShardedWriter",
    "TaskVectorSource",
    "TaskVectorStore",
    "TorchFileSource",
    "atomic_dir",
    "atomic_file",
    "atomic_open",
    "build_model_card",
    "check_compatible",
    "load_into",
    "load_torch_file",
    "merge_lora_adapters",
    "merge_to",
    "open_source",
    "parse_size",
    "save_hf_folder",
    "save_lightning_checkpoint",
    "save_safetensors",
    "sha256_file",
]
