"""PEFT LoRA adapter folders read as full fine-tuned weights: ``W + scaling * B @ A``.

Merging methods work on full task vectors, and the task vector of a LoRA fine-tune is its
low-rank update. Reading an adapter as full weights against its base (rather than merging
the A and B factors, which would not commute with trim and sign election) gives the engine
the same tensors PEFT's ``merge_and_unload()`` would produce, one target weight at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..merging.sources import StateDictSource, TensorSource, TensorSpec
from .errors import CheckpointError
from .hf_folder import ADAPTER_CONFIG
from .jsonsafe import loads as load_json
from .readers import SafetensorsSource, load_torch_file

_PEFT_PREFIX = "base_model.model."
_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")


@dataclass(frozen=True)
class _LowRankUpdate:
    a_key: str
    b_key: str
    scaling: float
    transpose: bool


class LoraSource:
    """A PEFT LoRA adapter folder seen as the full fine-tuned model ``base + scaling * B @ A``.

    Respects ``lora_alpha``, ``r`` (taken from the factors' shapes, so ``rank_pattern`` is
    honoured), ``alpha_pattern``, ``use_rslora`` (scaling ``alpha / sqrt(r)``),
    ``fan_in_fan_out`` and embedding adapters; ``modules_to_save`` weights replace base's.
    DoRA and LoRA biases are refused (their update is not ``B @ A``).

    Example:
        >>> import tempfile
        >>> from peft import LoraConfig, get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> base = {k: v.clone() for k, v in net.state_dict().items()}
        >>> folder = tempfile.mkdtemp()
        >>> get_peft_model(net, LoraConfig(r=2, target_modules=["0"])).save_pretrained(folder)
        >>> src = LoraSource(folder, StateDictSource(base))
        >>> torch.equal(src.get("0.weight"), base["0.weight"])  # B starts at zero
        True
    """

    def __init__(self, folder: str | Path, base: TensorSource, label: str | None = None) -> None:
        self.folder = Path(folder)
        self.label = label or str(self.folder)
        self.base = base
        self.prefix = ""
        config = self._read_config()
        self._adapter = self._open_weights()
        self.files = list(getattr(self._adapter, "files", [])) or [self.folder]
        self._updates: dict[str, _LowRankUpdate] = {}
        self._replaced: dict[str, str] = {}
        self._index(config)

    # ---- reading the folder ---------------------------------------------------------------
    def _read_config(self) -> dict:
        path = self.folder / ADAPTER_CONFIG
        try:
            config = load_json(path.read_bytes(), str(path))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read the adapter config ({err})") from None
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
        unsupported = [name for name in ("use_dora", "lora_bias") if config.get(name)]
        if unsupported:
            raise CheckpointError(
                f"{path}: {', '.join(unsupported)} is set; its update is not scaling * B @ A, so it cannot be "
                "read as a task vector here. Merge it with PEFT's merge_and_unload() and save the full model."
            )
        return config

    def _open_weights(self) -> TensorSource:
        st, pt = self.folder / "adapter_model.safetensors", self.folder / "adapter_model.bin"
        if st.is_file():
            return SafetensorsSource([st], str(st))
        if pt.is_file():
            obj = load_torch_file(pt)
            src = StateDictSource(obj, str(pt))
            src.files = [pt]  # type: ignore[attr-defined]
            return src
        raise CheckpointError(f"{self.folder}: adapter folder without adapter_model.safetensors or adapter_model.bin")

    def _index(self, config: dict) -> None:
        factors: dict[str, dict[str, str]] = {}
        problems: list[str] = []
        for key in self._adapter.keys():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            match = _LINEAR.match(name) or _EMBEDDING.match(name)
            if match is None:
                self._add_full_weight(name, key, problems)
                continue
            is_embedding = match.re is _EMBEDDING
            slot = factors.setdefault(match["module"], {"embedding": str(is_embedding)})
            slot[match["ab"]] = key
        for module, slot in factors.items():
            self._add_update(module, slot, config, problems)
        if problems:
            raise CheckpointError(f"{self.folder}: adapter does not fit its base model:\n  " + "\n  ".join(problems))

    def _add_full_weight(self, name: str, key: str, problems: list[str]) -> None:
        # A saved module the base lacks (a new task head) keeps its own name: the merge plan
        # reports it as not in base.
        target = self._resolve(name, problems, missing_ok=True)
        if target is not None:
            self._replaced[target] = key

    def _add_update(self, module: str, slot: dict[str, str], config: dict, problems: list[str]) -> None:
        if "A" not in slot or "B" not in slot:
            problems.append(f"{module}: only one of the LoRA factors A and B is present")
            return
        target = self._resolve(module + ".weight", problems)
        if target is None:
            return
        a, b = self._adapter.spec(slot["A"]).shape, self._adapter.spec(slot["B"]).shape
        is_embedding = slot["embedding"] == "True"
        transpose = is_embedding or bool(config.get("fan_in_fan_out", False))
        shape = (a[1], b[0]) if transpose else (b[0], a[1])
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or shape != self.base.spec(target).shape:
            problems.append(f"{module}: B {b} @ A {a} does not give base's {target!r} shape {self.base.spec(target).shape}")
            return
        rank = a[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        self._updates[target] = _LowRankUpdate(slot["A"], slot["B"], scaling, transpose)

    def _resolve(self, name: str, problems: list[str], missing_ok: bool = False) -> str | None:
        """The base key a name from the adapter refers to (adapters made on a wrapper add a prefix)."""
        base_keys = self.base.keys()
        if name in base_keys:
            return name
        found = [k for k in base_keys if name.endswith("." + k) or k.endswith("." + name)]
        if len(found) == 1:
            return found[0]
        if not found and missing_ok:
            return name
        problems.append(f"{name}: {'no' if not found else 'several (' + ', '.join(found[:3]) + ')'} matching key in base")
        return None

    # ---- the TensorSource interface -------------------------------------------------------
    def keys(self) -> Sequence[str]:
        base_keys = list(self.base.keys())
        known = set(base_keys)
        return base_keys + [k for k in self._replaced if k not in known]

    def spec(self, key: str) -> TensorSpec:
        if key in self._replaced:
            return self._adapter.spec(self._replaced[key])
        return self.base.spec(key)

    def get(self, key: str) -> torch.Tensor:
        if key in self._replaced:
            return self._adapter.get(self._replaced[key])
        weight = self.base.get(key)
        update = self._updates.get(key)
        if update is None:
            return weight
        if weight.dtype == torch.float32:
            return weight + self.delta(key)
        return (weight.to(torch.float32) + self.delta(key)).to(weight.dtype)

    def delta(self, key: str) -> torch.Tensor:
        """The low-rank update ``scaling * B @ A`` of one target weight, in float32 (PEFT's order of operations)."""
        update = self._updates[key]
        a = self._adapter.get(update.a_key).to(torch.float32)
        b = self._adapter.get(update.b_key).to(torch.float32)
        product = b @ a
        return (product.T if update.transpose else product) * update.scaling

    @property
    def targets(self) -> list[str]:
        """Base keys that the adapter updates with a low-rank product."""
        return list(self._updates)


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: a pattern matches a module name or any dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default
