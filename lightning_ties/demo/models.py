"""The demo's network and its per-task heads (pure torch; training with a Trainer is in :mod:`.training`).

Recipe of the paper's vision experiments (task arithmetic and TIES on CLIP): every task has
its own classification head, fixed before fine-tuning (there: the zero-shot head; here: a linear
probe of the pretrained features), and fine-tuning updates the shared body only. The merged
body is then evaluated with each task's head, and "base" means the pretrained body with that
same head, so every row of the table differs only in the body.

Example:
    >>> net = DigitsNet(num_classes=2, hidden=16)
    >>> net(torch.zeros(3, 64)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Keys of a DigitsNet that are task-specific (never merged, each task keeps its own).
HEAD_PATTERN = r"^head\."


class DigitsNet(nn.Module):
    """An MLP for 8x8 digits: a shared ``body`` (what is merged) and a task ``head``."""

    def __init__(self, num_classes: int = 10, hidden: int = 128, depth: int = 2, in_features: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.no_grad()
def features(net: DigitsNet, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return net.body(x)


def linear_probe(net: DigitsNet, x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 300) -> nn.Linear:
    """A head fitted on frozen ``net.body`` features (full-batch, deterministic): the task's head."""
    feats = features(net, x)
    head = nn.Linear(feats.shape[1], num_classes)
    torch.manual_seed(0)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # a small L2 penalty keeps the probe well-posed when features separate the classes
        loss = F.cross_entropy(head(feats), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.requires_grad_(False)
