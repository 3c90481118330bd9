"""Tokenisation, batching, the training loss and candidate scoring.

Everything here reads log-probabilities of chosen tokens at chosen positions. The LM head runs only on
those positions (not on every position of the batch): for a 49k-token vocabulary that is a fifth of a
small model's forward pass, and the full logits tensor would be the largest activation.

A *request* is a token sequence plus the (position, candidate tokens) pairs to read: the log-probability
that the token after ``position`` is each candidate token. A continuation of n tokens is n pairs with one
token each; classification with single-token candidates sharing a prompt is one pair with all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoexp.tasks import Example


@dataclass
class Request:
    ids: list[int]
    reads: list[tuple[int, list[int]]]  # (position, tokens whose log-prob after that position we want)


class Encoder:
    """Tokenises (prompt, continuation) pairs: the prompt is truncated from the left to fit ``max_length``.

    The split between prompt and continuation tokens is read from the character offsets of the
    tokenised full text (robust to tokenizers that merge a leading space, add a dummy prefix, ...).
    """

    def __init__(self, tokenizer, max_length: int = 2048):
        self.tok = tokenizer
        self.max_length = int(max_length)
        self.truncated = 0  # examples whose prompt lost tokens to truncation
        self._cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def encode(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of prompt+continuation and the number of continuation tokens at the end."""
        key = (prompt, continuation)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ids, n_cont = self._split(prompt, continuation)
        if len(ids) > self.max_length:
            keep_bos = 1 if (self.tok.bos_token_id is not None and ids and ids[0] == self.tok.bos_token_id) else 0
            excess = len(ids) - self.max_length
            if excess > len(ids) - n_cont - keep_bos:
                raise ValueError(f"continuation of {n_cont} tokens does not fit max_length={self.max_length}")
            ids = ids[:keep_bos] + ids[keep_bos + excess:]
            self.truncated += 1
        self._cache[key] = (ids, n_cont)
        return ids, n_cont

    def _split(self, prompt: str, continuation: str) -> tuple[list[int], int]:
        text = prompt + continuation
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            boundary = len(prompt)
            n_cont = sum(1 for (start, end) in offsets if end > boundary and end > start)
            if n_cont == 0 and continuation:
                raise ValueError(f"continuation {continuation!r} produced no tokens")
            # special tokens appended at the end (e.g. eos) have empty offsets: not part of the continuation
            tail_specials = 0
            for start, end in reversed(offsets):
                if start == end:
                    tail_specials += 1
                else:
                    break
            if tail_specials:
                ids = ids[: len(ids) - tail_specials]
            return list(ids), n_cont
        prompt_ids = self.tok(prompt)["input_ids"]
        cont_ids = self.tok(continuation, add_special_tokens=False)["input_ids"]
        return list(prompt_ids) + list(cont_ids), len(cont_ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = list(self.tok(prompt)["input_ids"])
        if len(ids) > self.max_length:
            keep_bos = 1 if (self.tok.bos_token_id is not None and ids[0] == self.tok.bos_token_id) else 0
            ids = ids[:keep_bos] + ids[keep_bos + len(ids) - self.max_length:]
            self.truncated += 1
        return ids

    def continuation_request(self, prompt: str, continuation: str) -> Request:
        ids, n_cont = self.encode(prompt, continuation)
        start = len(ids) - n_cont
        return Request(ids, [(t - 1, [ids[t]]) for t in range(start, len(ids))])


def collate(seqs: Sequence[list[int]], pad_id: int, device, side: str = "right"):
    """Pad to the longest sequence; position ids count real tokens only, so either side gives the same logits."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, longest - len(s):] = torch.tensor(s)
            mask[i, longest - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def hidden_states(model, ids, mask, positions) -> torch.Tensor:
    """Final hidden states (after the last norm), without the LM head."""
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return out[0]


def read_positions(requests: Sequence[Request], longest: int, device, side: str = "right"):
    """(rows, cols) of the hidden states each read needs, in request order."""
    rows, cols = [], []
    for b, r in enumerate(requests):
        offset = longest - len(r.ids) if side == "left" else 0
        for pos, _ in r.reads:
            rows.append(b)
            cols.append(pos + offset)
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def logprobs_from_hidden(model, hidden: torch.Tensor, requests: Sequence[Request], rows, cols) -> list[list[torch.Tensor]]:
    """The LM head on the read positions only, then the log-probabilities of each read's tokens."""
    device = hidden.device
    head = model.get_output_embeddings()
    logits = head(hidden[rows, cols]).float()
    logprobs = F.log_softmax(logits, dim=-1)
    out, k = [], 0
    for r in requests:
        per = []
        for _, tokens in r.reads:
            per.append(logprobs[k, torch.tensor(tokens, device=device)])
            k += 1
        out.append(per)
    return out


def read_logprobs(model, requests: Sequence[Request], pad_id: int, side: str = "right") -> list[list[torch.Tensor]]:
    """For each request and each of its reads, the log-probabilities of the read's tokens (a 1-D tensor)."""
    device = next(model.parameters()).device
    ids, mask, positions = collate([r.ids for r in requests], pad_id, device, side)
    hidden = hidden_states(model, ids, mask, positions)
    rows, cols = read_positions(requests, ids.shape[1], device, side)
    return logprobs_from_hidden(model, hidden, requests, rows, cols)


def target_requests(encoder: Encoder, batch: Sequence[Example]) -> list[Request]:
    """One continuation request per example: the prompt followed by its target (answer) tokens."""
    return [encoder.continuation_request(ex.prompt, ex.target) for ex in batch]


def mean_nll(per_request: list[list[torch.Tensor]]) -> torch.Tensor:
    """Negative log-likelihood averaged over every target token of the batch."""
    token_logprobs = torch.cat([torch.cat(reads) for reads in per_request])
    return -token_logprobs.mean()


def lm_loss(model, encoder: Encoder, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Cross-entropy on the target (answer) tokens only, averaged over all target tokens of the batch."""
    return mean_nll(read_logprobs(model, target_requests(encoder, batch), pad_id))


def classification_requests(encoder: Encoder, ex: Example) -> tuple[list[Request], str]:
    """Requests that score every candidate of ``ex``: one shared request if all candidates are single
    tokens after the same prompt tokens, else one request per candidate. Returns (requests, kind)."""
    encoded = [encoder.encode(ex.prompt, c) for c in ex.candidates]
    prompts = {tuple(ids[: len(ids) - n]) for ids, n in encoded}
    if all(n == 1 for _, n in encoded) and len(prompts) == 1:
        prompt = list(next(iter(prompts)))
        return [Request(prompt, [(len(prompt) - 1, [ids[-1] for ids, _ in encoded])])], "shared"
    return [encoder.continuation_request(ex.prompt, c) for c in ex.candidates], "separate"


@torch.no_grad()
def score_candidates(model, encoder: Encoder, examples: Sequence[Example], pad_id: int,
                     batch_size: int = 16, side: str = "right", progress=None) -> list[list[float]]:
    """Mean log-likelihood of each candidate's tokens, per example (MeZO's classification score).

    Requests of all examples are sorted by length and batched, ``batch_size`` sequences at a time.
    """
    flat: list[tuple[int, int | None, Request]] = []  # (example, candidate or None=shared, request)
    for e, ex in enumerate(examples):
        requests, kind = classification_requests(encoder, ex)
        if kind == "shared":
            flat.append((e, None, requests[0]))
        else:
            flat.extend((e, c, r) for c, r in enumerate(requests))
    scores: list[list[float]] = [[float("nan")] * len(ex.candidates) for ex in examples]
    order = sorted(range(len(flat)), key=lambda i: len(flat[i][2].ids), reverse=True)
    for start in range(0, len(order), batch_size):
        chunk = [flat[i] for i in order[start:start + batch_size]]
        results = read_logprobs(model, [r for _, _, r in chunk], pad_id, side)
        for (e, c, _), reads in zip(chunk, results):
            if c is None:
                scores[e] = reads[0].tolist()
            else:
                scores[e][c] = torch.cat(reads).mean().item()
        if progress is not None:
            progress(len(chunk))
    return scores
