"""The training closure: one forward pass on a batch, as a method's ``step(closure)`` calls it.

``LossClosure`` is what the runner hands each optimizer step (and what ``zoexp.memory`` runs on fake
tensors); ``Counters`` counts the forward passes and tokens it spends. No backward: methods decide.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from zoexp import distributed
from zoexp.scoring import Encoder, classification_loss, lm_loss, request_tokens
from zoexp.tasks import Example


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Counters:
    forward_passes: int = 0
    tokens: int = 0
    curve: list = field(default_factory=list)
    dev_curve: list = field(default_factory=list)


class LossClosure:
    """One forward pass on ``batch``: the loss on the answer tokens (``lm``), or MeZO's
    train_as_classification (``classification``: cross-entropy over the candidates' scores).
    No backward (methods decide).

    ``closure(part, parts)`` (gradient accumulation) runs only the ``part``-th of ``parts`` contiguous
    slices of the batch and scales its mean loss by the slice's share of the batch's loss weight (answer
    tokens, or examples for ``classification``), so the parts' losses -- and their gradients -- add up
    to those of the whole batch. The parts of one batch count as one forward pass.

    ``accumulation_steps = k > 1`` (``run.accumulation_steps``, ZO gradient accumulation): a plain
    ``closure()`` returns the sum of the k parts' losses, computed one micro-batch after the other under
    the same weights -- the same perturbation -- so the whole batch's loss comes from k smaller forward
    passes (k times less activation memory; still one forward pass in the counts).

    ``dual(perturbation)`` is the offloaded variant for ZO methods: both perturbed losses from one pass
    through resident blocks (``zoexp.scoring.dual_lm_loss``); it counts as two forward passes.
    """

    def __init__(self, model, encoder: Encoder, batch: list[Example], pad_id: int, counters: Counters,
                 loss: str = "lm", accumulation_steps: int = 1):
        self.model, self.encoder, self.batch, self.pad_id, self.counters = model, encoder, batch, pad_id, counters
        self.loss = loss
        self.accumulation_steps = int(accumulation_steps)
        self.loss_fn = {"lm": lm_loss, "classification": classification_loss}[loss]
        self.n_tokens = [request_tokens(encoder, [ex], loss) for ex in batch]
        self.weights = [distributed.loss_weight(encoder, [ex], loss) for ex in batch]

    def __call__(self, part: int = 0, parts: int = 1):
        batch, counters = self.batch, self.counters
        if parts == 1 and self.accumulation_steps > 1:
            k = self.accumulation_steps
            return sum(self(p, k) for p in range(k))
        if parts == 1:
            counters.forward_passes += 1
            counters.tokens += sum(self.n_tokens)
            return self.loss_fn(self.model, self.encoder, batch, self.pad_id)
        if not 0 <= part < parts <= len(batch):
            raise ValueError(f"cannot split a batch of {len(batch)} examples into {parts} parts (part {part}); "
                             "accumulation steps must not exceed run.batch_size (per process)")
        lo, hi = part * len(batch) // parts, (part + 1) * len(batch) // parts
        counters.forward_passes += part == 0
        counters.tokens += sum(self.n_tokens[lo:hi])
        share = sum(self.weights[lo:hi]) / sum(self.weights)
        return self.loss_fn(self.model, self.encoder, batch[lo:hi], self.pad_id) * share

    def dual(self, perturbation):
        from zoexp.scoring import dual_lm_loss

        if self.accumulation_steps > 1:
            raise ValueError("run.offload streams each block once per step for the whole batch: it does not "
                             "combine with run.accumulation_steps > 1")
        if self.loss != "lm":
            raise ValueError("run.offload supports run.loss=lm only")
        self.counters.forward_passes += 2
        self.counters.tokens += 2 * sum(self.n_tokens)
        return dual_lm_loss(self.model, self.encoder, self.batch, self.pad_id, perturbation)


def make_closure(model, encoder: Encoder, batch: list[Example], pad_id: int, counters: Counters,
                 loss: str = "lm", accumulation_steps: int = 1) -> LossClosure:
    return LossClosure(model, encoder, batch, pad_id, counters, loss, accumulation_steps)
