"""Toy problems with known answers for optimizer tests (importable by every test module)."""

from __future__ import annotations

import torch
from torch import nn


class Quadratic(nn.Module):
    """L(θ) = ½ Σ_i a_i (θ_i − c_i)², with a matrix block and a vector block (two param groups).

    The gradient and the diagonal Hessian (a) are known exactly.
    """

    def __init__(self, shape=(8, 6), n_vec: int = 6, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(n_vec, generator=g, dtype=dtype))
        self.register_buffer("a_w", (torch.rand(shape, generator=g, dtype=dtype) * 4 + 0.5))
        self.register_buffer("a_b", (torch.rand(n_vec, generator=g, dtype=dtype) * 4 + 0.5))
        self.register_buffer("c_w", torch.randn(shape, generator=g, dtype=dtype))
        self.register_buffer("c_b", torch.randn(n_vec, generator=g, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return 0.5 * ((self.a_w * (self.w - self.c_w) ** 2).sum() + (self.a_b * (self.b - self.c_b) ** 2).sum())

    def grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a_w * (self.w - self.c_w), self.a_b * (self.b - self.c_b)

    def groups(self) -> list[dict]:
        return [
            {"params": [self.w], "names": ["w"], "role": "block", "name": "layers.0", "block": 0},
            {"params": [self.b], "names": ["b"], "role": "norm", "name": "norm", "block": None},
        ]


def flat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])
