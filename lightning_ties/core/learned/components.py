"""Each task's share delta_t of the merge, stored compactly, and the differentiable merge of one key."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn


class TaskComponents(nn.Module):
    """Each task's share delta_t of every merged key, stored densely or as values + flat indices.

    A key is stored sparsely (float32 values, int32/int64 indices, per-task counts) when that
    takes less memory than the dense ``[N, numel]`` block (the trimmed TIES components keep only
    about a fraction k); the merge is exact either way (same float32 products and sums). A key
    whose components are all zero stores nothing and stays base's. Buffers are not persistent: checkpoints hold only the coefficients.

    Example:
        >>> comps = TaskComponents.from_iterable(iter([("w", torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))]), 2)
        >>> comps.merged("w", torch.zeros(3), torch.tensor([1.0, 0.5]))
        tensor([1., 0., 1.])
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.keys: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.layouts: list[str] = []  # "sparse", "dense" or "empty" (all components zero)
        self._buffer_names: list[str] = []

    @classmethod
    def from_iterable(cls, components: Iterator[tuple[str, torch.Tensor]], n_tasks: int) -> TaskComponents:
        store = cls(n_tasks)
        for key, deltas in components:
            store.add(key, deltas)
        return store

    def add(self, key: str, deltas: torch.Tensor) -> None:
        flat = deltas.detach().reshape(self.n_tasks, -1).to(torch.float32)
        nnz = int(torch.count_nonzero(flat))
        index_dtype = torch.int32 if flat.shape[1] < 2**31 else torch.int64
        name = f"c{len(self.keys)}"
        if nnz == 0:
            layout = "empty"  # no task changes this key: it stays base's, outside the autograd graph
        elif nnz * (4 + index_dtype.itemsize) < flat.numel() * 4:
            layout = "sparse"
            task_idx, pos = torch.nonzero(flat, as_tuple=True)  # row-major: grouped by task
            self.register_buffer(f"{name}_values", flat[task_idx, pos].contiguous(), persistent=False)
            self.register_buffer(f"{name}_index", pos.to(index_dtype), persistent=False)
            self.register_buffer(f"{name}_counts", torch.bincount(task_idx, minlength=self.n_tasks), persistent=False)
        else:
            layout = "dense"
            self.register_buffer(f"{name}_dense", flat.contiguous(), persistent=False)
        self.keys.append(key)
        self.layouts.append(layout)
        self.shapes.append(tuple(deltas.shape[1:]))
        self._buffer_names.append(name)

    def merged(self, i_or_key: int | str, base: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``base + sum_t coefficients[t] * delta_t`` for one key, float32, base's shape."""
        i = self.keys.index(i_or_key) if isinstance(i_or_key, str) else i_or_key
        name, layout = self._buffer_names[i], self.layouts[i]
        flat = base.reshape(-1).to(torch.float32)
        if layout == "sparse":
            values = getattr(self, f"{name}_values")
            counts = getattr(self, f"{name}_counts")
            scale = coefficients.to(values.dtype).repeat_interleave(counts, output_size=values.numel())
            flat = flat.index_add(0, getattr(self, f"{name}_index"), values * scale)
        elif layout == "dense":
            flat = flat + coefficients.to(torch.float32) @ getattr(self, f"{name}_dense")
        return flat.view(base.shape)

    def stacked(self, key: str) -> torch.Tensor:
        """The components of one key as a dense ``[N, *shape]`` tensor (for inspection and tests)."""
        i = self.keys.index(key)
        name, layout, shape = self._buffer_names[i], self.layouts[i], self.shapes[i]
        if layout == "dense":
            return getattr(self, f"{name}_dense").reshape(self.n_tasks, *shape).clone()
        out = torch.zeros(self.n_tasks, math.prod(shape))
        if layout == "sparse":
            values = getattr(self, f"{name}_values")
            rows = torch.repeat_interleave(torch.arange(self.n_tasks, device=values.device), getattr(self, f"{name}_counts"))
            out = out.to(values.device)
            out[rows, getattr(self, f"{name}_index").long()] = values
        return out.reshape(self.n_tasks, *shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


__all__ = ["TaskComponents"]
