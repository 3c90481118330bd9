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


class BlockQuadratic(nn.Module):
    """L(θ) = ½ Σ_i a_i (θ_i − c_i)² laid out like a small transformer: an ``embed`` vector, ``n_blocks``
    blocks (each a matrix and a bias, one param group with role ``block``) and a ``head`` vector.

    Gradient and diagonal Hessian (a) are known exactly; ``scales`` multiplies block b's curvature so blocks
    can be made to differ in importance.
    """

    def __init__(self, n_blocks: int = 6, shape=(4, 3), n_vec: int = 5, seed: int = 0, scales=None,
                 dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        scales = list(scales) if scales is not None else [1.0] * n_blocks
        self.embed = nn.Parameter(torch.randn(n_vec, generator=g, dtype=dtype))
        self.blocks = nn.ModuleList()
        for _ in range(n_blocks):
            m = nn.Module()
            m.w = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
            m.bias = nn.Parameter(torch.randn(shape[0], generator=g, dtype=dtype))
            self.blocks.append(m)
        self.head = nn.Parameter(torch.randn(n_vec, generator=g, dtype=dtype))
        for i, p in enumerate(self.ordered()):
            block = i - 1
            scale = scales[block // 2] if 0 <= block < 2 * n_blocks else 1.0
            self.register_buffer(f"a{i}", (torch.rand(p.shape, generator=g, dtype=dtype) * 4 + 0.5) * scale)
            self.register_buffer(f"c{i}", torch.randn(p.shape, generator=g, dtype=dtype))
        self.n_blocks = n_blocks

    def ordered(self) -> list[nn.Parameter]:
        """embed, blocks.0.w, blocks.0.bias, ..., head: the order of grad() and hessian()."""
        return [self.embed, *(p for m in self.blocks for p in (m.w, m.bias)), self.head]

    def _pairs(self):
        for i, p in enumerate(self.ordered()):
            yield p, getattr(self, f"a{i}"), getattr(self, f"c{i}")

    def forward(self) -> torch.Tensor:
        return 0.5 * sum((a * (p - c) ** 2).sum() for p, a, c in self._pairs())

    def grad(self) -> list[torch.Tensor]:
        return [a * (p.detach() - c) for p, a, c in self._pairs()]

    def hessian(self) -> list[torch.Tensor]:
        return [a for _, a, _ in self._pairs()]

    def block_params(self, b: int) -> list[torch.Tensor]:
        return [self.blocks[b].w, self.blocks[b].bias]

    def groups(self) -> list[dict]:
        groups = [{"params": [self.embed], "names": ["embed"], "role": "embed", "name": "embed", "block": None}]
        for b in range(self.n_blocks):
            groups.append({"params": self.block_params(b), "names": [f"blocks.{b}.w", f"blocks.{b}.bias"],
                           "role": "block", "name": f"layers.{b}", "block": b})
        groups.append({"params": [self.head], "names": ["head"], "role": "head", "name": "head", "block": None})
        return groups
