"""Tokenisation, batching, the training loss and candidate scoring.

Everything here reads log-probabilities of chosen tokens at chosen positions. The LM head runs only on
those positions (not on every position of the batch): for a 49k-token vocabulary that is a fifth of a
small model's forward pass, and the full logits tensor would be the largest activation.

A *request* is a token sequence plus the (position, candidate tokens) pairs to read: the log-probability
that the token after ``position`` is each candidate token. A continuation of n tokens is n pairs with one
token each; classification with single-token candidates sharing a prompt is one pair with all of them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from zoexp.models import layer_inputs, run_layer, tail_modules
from zoexp.tasks import Example


@dataclass
class Request:
    ids: list[int]
    reads: list[tuple[int, list[int]]]  # (position, tokens whose log-prob after that position we want)


class Encoder:
    """Tokenises (prompt, continuation) pairs and makes them fit ``max_length`` tokens.

    The split between prompt and continuation tokens is read from the character offsets of the
    tokenised full text (robust to tokenizers that merge a leading space, add a dummy prefix, ...).
    A prompt that yields no token at all (e.g. TREC's empty prompt) is preceded by the start-of-text
    token (BOS, else EOS), so the first continuation token has something to be predicted from.

    Too long: if the example marks a passage (``passage`` = [start, end) characters of the prompt), whole
    tokens are cut from the left of the passage only, so the question and the answer stay intact; what
    is still too long (or an unmarked prompt) loses tokens from the left of the prompt. The continuation
    is never cut. ``truncated`` counts the distinct prompts that lost text.
    """

    def __init__(self, tokenizer, max_length: int = 2048):
        self.tok = tokenizer
        self.max_length = int(max_length)
        self._truncated: set = set()
        self._cache: dict[tuple, tuple[list[int], int]] = {}

    @property
    def truncated(self) -> int:
        return len(self._truncated)

    def reset_truncated(self) -> None:
        self._truncated.clear()

    def encode(self, prompt: str, continuation: str, passage: tuple[int, int] | None = None,
               reserve: int = 0) -> tuple[list[int], int]:
        """Token ids of prompt+continuation and the number of continuation tokens at the end.

        ``reserve`` tokens of ``max_length`` are kept free (generation: the new tokens).
        """
        key = (prompt, continuation, passage, reserve)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        limit = self.max_length - reserve
        ids, n_cont = self._split(prompt, continuation)
        if len(ids) > limit:
            self._truncated.add((prompt, passage))
            if passage is not None and getattr(self.tok, "is_fast", False):
                ids, n_cont = self._cut_passage(prompt, continuation, passage, limit)
            if len(ids) > limit:
                ids = self._cut_left(ids, n_cont, limit)
        self._cache[key] = (ids, n_cont)
        return ids, n_cont

    def _cut_left(self, ids: list[int], n_cont: int, limit: int) -> list[int]:
        keep_bos = 1 if (self.tok.bos_token_id is not None and ids and ids[0] == self.tok.bos_token_id) else 0
        excess = len(ids) - limit
        if excess > len(ids) - n_cont - keep_bos:
            raise ValueError(f"continuation of {n_cont} tokens does not fit max_length={limit}")
        return ids[:keep_bos] + ids[keep_bos + excess:]

    def _cut_passage(self, prompt: str, continuation: str, passage: tuple[int, int],
                     limit: int) -> tuple[list[int], int]:
        """Drop whole tokens from the left of the passage until prompt+continuation fits (a few re-tokenisations:
        removing text can change how the characters around the cut merge)."""
        start, end = passage
        for _ in range(8):
            enc = self.tok(prompt + continuation, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            excess = len(ids) - limit
            if excess <= 0:
                break
            inside = [i for i, (s, e) in enumerate(offsets) if s >= start and e <= end and e > s]
            if not inside:
                break
            cut = offsets[inside[excess]][0] if excess < len(inside) else end
            prompt = prompt[:start] + prompt[cut:]
            end -= cut - start
        return self._split(prompt, continuation)

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
            ids = list(ids)
        else:
            prompt_ids = self.tok(prompt)["input_ids"] if prompt else []
            cont_ids = self.tok(continuation, add_special_tokens=False)["input_ids"]
            ids, n_cont = list(prompt_ids) + list(cont_ids), len(cont_ids)
        if continuation and n_cont == len(ids):
            start_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
            ids = [start_id] + ids
        return ids, n_cont

    def length(self, prompt: str, continuation: str = "") -> int:
        """Tokens of prompt+continuation before any truncation."""
        return len(self._split(prompt, continuation)[0])

    def prompt_ids(self, prompt: str, passage: tuple[int, int] | None = None, reserve: int = 0) -> list[int]:
        """Token ids of a prompt to generate from, fitting ``max_length - reserve``."""
        return self.encode(prompt, "", passage, reserve)[0]

    def continuation_request(self, prompt: str, continuation: str, passage: tuple[int, int] | None = None) -> Request:
        ids, n_cont = self.encode(prompt, continuation, passage)
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
    # indices on the hidden states' device: with a device map, hidden states and logits may live on other
    # devices than the input embeddings
    logits = head(hidden[rows.to(device), cols.to(device)]).float()
    logprobs = F.log_softmax(logits, dim=-1)
    out, k = [], 0
    for r in requests:
        per = []
        for _, tokens in r.reads:
            per.append(logprobs[k, torch.tensor(tokens, device=logprobs.device)])
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
    return [encoder.continuation_request(ex.prompt, ex.target, ex.passage) for ex in batch]


def mean_nll(per_request: list[list[torch.Tensor]]) -> torch.Tensor:
    """Negative log-likelihood averaged over every target token of the batch."""
    token_logprobs = torch.cat([torch.cat(reads) for reads in per_request])
    return -token_logprobs.mean()


def lm_loss(model, encoder: Encoder, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Cross-entropy on the target (answer) tokens only, averaged over all target tokens of the batch."""
    from zoexp import mlm

    if mlm.is_masked_lm(model):  # masked-LM prompts (HZO Table 6): the loss at the mask, zoexp.mlm
        return mlm.mlm_loss(model, encoder, batch, pad_id)
    return mean_nll(read_logprobs(model, target_requests(encoder, batch), pad_id))


class GroupPerturbation(Protocol):
    """Moves param groups to a sign (+1, −1, 0) of the step's perturbation while they are resident
    (``zoexp.methods.deferred.DualPerturbation``); ``offloader`` is the ring the forward runs through
    (``zoexp.offload.BlockOffloader``: ``layers``, ``plan``, ``device``, ``acquire``/``release``)."""

    offloader: Any

    def set(self, group_ids: Iterable[int], sign: int) -> None: ...


@torch.no_grad()
def dual_lm_loss(model, encoder: Encoder, batch: Sequence[Example], pad_id: int,
                 perturbation: GroupPerturbation) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(θ+εd), L(θ−εd)), each ``lm_loss`` on ``batch``, from one pass over the layers: two streams of
    hidden states go through each layer while it is resident in the offloader's ring, the layer
    moved to +ε, then −ε, then restored by ``perturbation`` (``zoexp.offload``, "Dual forward")."""
    off = perturbation.offloader
    plan = off.plan
    requests = target_requests(encoder, batch)
    ids, mask, positions = collate([r.ids for r in requests], pad_id, off.device)
    rows, cols = read_positions(requests, ids.shape[1], off.device)
    off.manual = True
    try:
        perturbation.set(plan.embed, +1)
        h_plus, args, kwargs = layer_inputs(model, off.layers[0], ids, mask, positions)
        perturbation.set(plan.embed, -1)
        h_minus, _, _ = layer_inputs(model, off.layers[0], ids, mask, positions)
        perturbation.set(plan.embed - plan.head, 0)  # a tied head keeps the embedding's sign
        for i, layer in enumerate(off.layers):
            off.acquire(i)
            perturbation.set(plan.layers[i], +1)
            h_plus = run_layer(layer, h_plus, args, kwargs)
            perturbation.set(plan.layers[i], -1)
            h_minus = run_layer(layer, h_minus, args, kwargs)
            perturbation.set(plan.layers[i], 0)
            off.release(i, dirty=True)
        tail = tail_modules(model)
        perturbation.set(plan.tail, +1)
        for module in tail:
            h_plus = module(h_plus)
        perturbation.set(plan.tail, -1)
        for module in tail:
            h_minus = module(h_minus)
        perturbation.set(plan.tail, 0)
        perturbation.set(plan.head, +1)
        loss_plus = mean_nll(logprobs_from_hidden(model, h_plus, requests, rows, cols))
        perturbation.set(plan.head, -1)
        loss_minus = mean_nll(logprobs_from_hidden(model, h_minus, requests, rows, cols))
        perturbation.set(plan.head | plan.embed, 0)
    finally:
        off.manual = False
    off.synchronize()
    return loss_plus, loss_minus


def classification_loss(model, encoder: Encoder, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """MeZO's ``train_as_classification``: cross-entropy of the gold candidate against all candidates, the
    logit of a candidate being its mean token log-likelihood (the evaluation score). One forward pass over
    the requests of the whole batch; averaged over examples."""
    if any(not ex.candidates for ex in batch):
        raise ValueError("run.loss=classification needs a classification task (candidates)")
    flat, kinds = [], []
    for ex in batch:
        requests, kind = classification_requests(encoder, ex)
        flat.extend(requests)
        kinds.append((kind, len(requests)))
    results = read_logprobs(model, flat, pad_id)
    losses, k = [], 0
    for ex, (kind, n) in zip(batch, kinds):
        if kind == "shared":
            scores = results[k][0]
        else:
            scores = torch.stack([torch.cat(reads).mean() for reads in results[k:k + n]])
        k += n
        losses.append(-F.log_softmax(scores, dim=-1)[ex.label])
    return torch.stack(losses).mean()


def request_tokens(encoder: Encoder, batch: Sequence[Example], loss: str = "lm") -> int:
    """Tokens one training forward pass processes (for the tokens/s figures)."""
    if loss == "classification":
        return sum(len(r.ids) for ex in batch for r in classification_requests(encoder, ex)[0])
    return sum(len(encoder.encode(ex.prompt, ex.target, ex.passage)[0]) for ex in batch)


def classification_requests(encoder: Encoder, ex: Example, share: bool = True) -> tuple[list[Request], str]:
    """Requests that score every candidate of ``ex``: one shared request if all candidates are single
    tokens after the same prompt tokens (and ``share``), else one request per candidate.
    Returns (requests, kind)."""
    encoded = [encoder.encode(ex.prompt, c, ex.passage) for c in ex.candidates]
    prompts = {tuple(ids[: len(ids) - n]) for ids, n in encoded}
    if share and all(n == 1 for _, n in encoded) and len(prompts) == 1:
        prompt = list(next(iter(prompts)))
        return [Request(prompt, [(len(prompt) - 1, [ids[-1] for ids, _ in encoded])])], "shared"
    return [encoder.continuation_request(ex.prompt, c, ex.passage) for c in ex.candidates], "separate"


@torch.no_grad()
def score_candidates(model, encoder: Encoder, examples: Sequence[Example], pad_id: int,
                     batch_size: int = 16, side: str = "right", progress=None,
                     share: bool = True, prefix_cache: bool = True) -> list[list[float]]:
    """Mean log-likelihood of each candidate's tokens, per example (MeZO's classification score).

    Requests of all examples (one per candidate, or one per example when the candidates are single tokens
    after one prompt and ``share``) are sorted by length and batched, ``batch_size`` sequences at a time.
    With ``prefix_cache``, requests that start with the same long run of tokens (ICL demonstrations, a
    ReCoRD passage under all its candidates) run that prefix once and only their own tokens per request
    (see ``shared_prefix_groups``); the tokens and the scores are the same as without it.
    MeZO's own loop is ``batch_size=1, share=False, prefix_cache=False``: one forward per candidate.
    ``progress`` is called with the number of examples completed.
    """
    flat: list[tuple[int, int | None, Request]] = []  # (example, candidate or None=shared, request)
    pending = [0] * len(examples)
    for e, ex in enumerate(examples):
        requests, kind = classification_requests(encoder, ex, share)
        if kind == "shared":
            flat.append((e, None, requests[0]))
        else:
            flat.extend((e, c, r) for c, r in enumerate(requests))
        pending[e] = len(requests)
    scores: list[list[float]] = [[float("nan")] * len(ex.candidates) for ex in examples]

    def collect(indices: list[int], results) -> None:
        done = 0
        for i, reads in zip(indices, results):
            e, c, _ = flat[i]
            if c is None:
                scores[e] = reads[0].tolist()
            else:
                scores[e][c] = torch.cat(reads).mean().item()
            pending[e] -= 1
            done += pending[e] == 0
        if progress is not None and done:
            progress(done)

    requests = [r for _, _, r in flat]
    groups = shared_prefix_groups(requests) if prefix_cache else []
    for prefix_len, members in groups:
        for indices, results in read_logprobs_with_prefix(model, requests, members, prefix_len, pad_id, batch_size):
            collect(indices, results)
    grouped = {i for _, members in groups for i in members}
    rest = sorted((i for i in range(len(flat)) if i not in grouped), key=lambda i: len(requests[i].ids), reverse=True)
    for start in range(0, len(rest), batch_size):
        chunk = rest[start:start + batch_size]
        collect(chunk, read_logprobs(model, [requests[i] for i in chunk], pad_id, side))
    return scores


def shared_prefix_groups(requests: Sequence[Request], min_tokens: int = 48) -> list[tuple[int, list[int]]]:
    """Groups of at least two requests that start with the same ``>= min_tokens`` tokens, as
    (prefix length, request indices). The prefix ends before each member's first read position, so every
    score is read from the member's own tokens. Requests are sorted by their token ids and grouped
    greedily; a request joins the open group if it keeps at least half of the group's prefix."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].ids)
    groups: list[tuple[int, list[int]]] = []
    head: list[int] = []
    length, members = 0, []
    for i in order:
        r = requests[i]
        limit = min(pos for pos, _ in r.reads)
        common = _common_length(head, r.ids, min(length, limit))
        if members and common >= max(min_tokens, length // 2):
            members.append(i)
            length = common
            continue
        if len(members) >= 2 and length >= min_tokens:
            groups.append((length, members))
        head, length, members = r.ids, limit, [i]
    if len(members) >= 2 and length >= min_tokens:
        groups.append((length, members))
    return groups


def _common_length(a: list[int], b: list[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


# Key/value memory that the prefix's cache may take once repeated for a batch (it is copied per row).
PREFIX_CACHE_BYTES = 512 * 2**20


@functools.cache
def _cache_keyword(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model.base_model``'s forward: transformers 5 names the key/value cache
    ``cache`` (``past_key_values`` is deprecated there and goes in 5.40), earlier versions
    ``past_key_values``. Read from the forward's signature, so both work without a version check."""
    return {_cache_keyword(type(model.base_model)): cache, "use_cache": True}


def cached_layers(model, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the token ids ``prefix`` (one row) through ``model.base_model`` with a cache and return its
    (keys, values) per layer."""
    ids = torch.tensor([list(prefix)], device=next(model.parameters()).device)
    out = model.base_model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def repeated_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int):
    """A key/value cache holding ``layers`` (one row each, from ``cached_layers``) for ``rows`` rows."""
    from transformers import DynamicCache

    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in layers],
                        config=model.config)


def read_logprobs_with_prefix(model, requests: Sequence[Request], members: list[int], prefix_len: int,
                              pad_id: int, batch_size: int):
    """Yields (request indices, their reads' log-probs) for ``members``, whose first ``prefix_len`` tokens
    are equal: the prefix runs once with a key/value cache; each batch runs only the members' own tokens
    (right-padded) after a copy of that cache, with positions counted from the end of the prefix."""
    device = next(model.parameters()).device
    layers = cached_layers(model, requests[members[0]].ids[:prefix_len])
    row_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    rows = max(1, min(batch_size, PREFIX_CACHE_BYTES // max(row_bytes, 1)))
    head = model.get_output_embeddings()
    order = sorted(members, key=lambda i: len(requests[i].ids), reverse=True)
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        ids, mask, positions = collate([requests[i].ids[prefix_len:] for i in chunk], pad_id, device, "right")
        b = len(chunk)
        cache = repeated_cache(model, layers, b)
        full_mask = torch.cat([torch.ones((b, prefix_len), dtype=mask.dtype, device=device), mask], dim=1)
        hidden = model.base_model(input_ids=ids, attention_mask=full_mask, position_ids=positions + prefix_len,
                                  **with_cache(model, cache))[0]
        rows_idx, cols = [], []
        for row, i in enumerate(chunk):
            for pos, _ in requests[i].reads:
                rows_idx.append(row)
                cols.append(pos - prefix_len)
        logits = head(hidden[torch.tensor(rows_idx, device=device), torch.tensor(cols, device=device)]).float()
        logprobs = F.log_softmax(logits, dim=-1)
        results, k = [], 0
        for i in chunk:
            per = []
            for _, tokens in requests[i].reads:
                per.append(logprobs[k, torch.tensor(tokens, device=device)])
                k += 1
            results.append(per)
        yield chunk, results
