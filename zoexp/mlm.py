"""Prompt-based classification with a masked language model (RoBERTa; LM-BFF / MeZO's medium models).

A masked-LM task's prompt holds one ``<mask>`` placeholder (``tasks/<task>-mlm.yaml``), e.g. SST-2's
``<sentence> It was<mask> .``; its candidates are the label words (`` terrible`` / `` great``), each a
single token. The model reads the prompt with the mask token in place of the placeholder; at the mask
position:

- score of candidate c = log p(c | prompt) over the vocabulary (prediction: the best candidate, i.e. the
  arg-max of the label words' logits, as LM-BFF);
- training loss = cross-entropy over the candidates' logits only (LM-BFF's prompt-based fine-tuning loss,
  also MeZO's for RoBERTa-large).

The LM head runs only at the mask positions. Sequences are ``[CLS]/<s> prompt [SEP]/</s>`` as the
tokenizer builds them; a prompt too long for the model loses tokens from the start of the text before
the mask (then from the end of the text after it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zoexp.tasks import Example

MASK = "<mask>"  # the placeholder in task prompts


def is_masked_lm(model) -> bool:
    return type(model).__name__.endswith("ForMaskedLM")


class MaskedPromptEncoder:
    """Token ids of masked prompts and of label words, cached per prompt."""

    def __init__(self, tokenizer, max_length: int, model_config=None):
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; set model.mask_token (or tokenizer.mask_token)")
        self.tok = tokenizer
        limit = int(max_length)
        max_pos = getattr(model_config, "max_position_embeddings", None)
        if max_pos is not None:
            # RoBERTa numbers positions from padding_idx + 1: two fewer usable positions
            offset = (getattr(model_config, "pad_token_id", 0) or 0) + 1 if "roberta" in str(
                getattr(model_config, "model_type", "")) else 0
            limit = min(limit, int(max_pos) - offset)
        self.max_length = limit
        self.truncated = 0
        self._prompts: dict[str, tuple[list[int], int]] = {}
        self._words: dict[str, int] = {}

    def prompt(self, text: str) -> tuple[list[int], int]:
        """(ids with special tokens, position of the mask)."""
        hit = self._prompts.get(text)
        if hit is not None:
            return hit
        if text.count(MASK) != 1:
            raise ValueError(f"a masked-LM prompt needs exactly one {MASK!r} placeholder: {text!r}")
        before, after = text.split(MASK)
        mask_id = self.tok.mask_token_id
        ids = list(self.tok(before + self.tok.mask_token + after)["input_ids"])  # with the model's special tokens
        if ids.count(mask_id) != 1:
            raise ValueError(f"the tokenizer did not keep the mask token of {text!r} as one token")
        pos = ids.index(mask_id)
        excess = len(ids) - self.max_length
        if excess > 0:
            self.truncated += 1
            specials = set(self.tok.all_special_ids) - {mask_id}
            lead = next((i for i, t in enumerate(ids) if t not in specials), len(ids))
            trail = next((i for i, t in enumerate(reversed(ids)) if t not in specials), 0)
            left, right = ids[lead:pos], ids[pos + 1:len(ids) - trail]
            cut = min(excess, len(left))
            left, excess = left[cut:], excess - cut
            right = right[: max(0, len(right) - excess)]
            ids = ids[:lead] + left + [mask_id] + right + ids[len(ids) - trail:]
            pos = ids.index(mask_id)
        self._prompts[text] = (list(ids), pos)
        return self._prompts[text]

    def word(self, text: str) -> int:
        """The token id of a label word (with its leading space, as LM-BFF); it must be one token."""
        hit = self._words.get(text)
        if hit is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"label word {text!r} is {len(ids)} tokens for this tokenizer; "
                                 "masked-LM prompts need single-token label words")
            hit = self._words[text] = ids[0]
        return hit


def encoder_for(encoder, model) -> MaskedPromptEncoder:
    """The masked-prompt encoder that goes with a scoring.Encoder (made once, kept on it)."""
    mlm = getattr(encoder, "_masked_prompt_encoder", None)
    if mlm is None:
        mlm = MaskedPromptEncoder(encoder.tok, encoder.max_length, getattr(model, "config", None))
        encoder._masked_prompt_encoder = mlm
    return mlm


def _head(model):
    for name in ("lm_head", "cls"):  # RoBERTa, BERT: transform + norm + decoder
        head = getattr(model, name, None)
        if head is not None:
            return head
    return None


def mask_logits(model, encoder: MaskedPromptEncoder, prompts: Sequence[str], pad_id: int) -> torch.Tensor:
    """Vocabulary logits at the mask position of each prompt: (len(prompts), vocab)."""
    device = next(model.parameters()).device
    encoded = [encoder.prompt(p) for p in prompts]
    longest = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (seq, _) in enumerate(encoded):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    rows = torch.arange(len(encoded), device=device)
    cols = torch.tensor([pos for _, pos in encoded], device=device)
    head = _head(model)
    if head is None:  # unknown masked LM: full logits, then pick
        return model(input_ids=ids, attention_mask=mask).logits[rows, cols].float()
    hidden = model.base_model(input_ids=ids, attention_mask=mask)[0]
    return head(hidden[rows, cols]).float()


def mlm_loss(model, encoder, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Cross-entropy over each example's label words at the mask (LM-BFF's prompt-based loss)."""
    mlm = encoder_for(encoder, model)
    logits = mask_logits(model, mlm, [ex.prompt for ex in batch], pad_id)
    losses = []
    for i, ex in enumerate(batch):
        words = torch.tensor([mlm.word(c) for c in ex.candidates], device=logits.device)
        losses.append(F.cross_entropy(logits[i, words][None], torch.tensor([ex.label], device=logits.device)))
    return torch.stack(losses).mean()


@torch.no_grad()
def score_candidates(model, encoder, examples: Sequence[Example], pad_id: int, batch_size: int = 16,
                     progress=None) -> list[list[float]]:
    """log p(label word | prompt) at the mask, per candidate of each example."""
    mlm = encoder_for(encoder, model)
    order = sorted(range(len(examples)), key=lambda i: len(mlm.prompt(examples[i].prompt)[0]), reverse=True)
    scores: list[list[float]] = [[] for _ in examples]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logprobs = F.log_softmax(mask_logits(model, mlm, [examples[i].prompt for i in idx], pad_id), dim=-1)
        for row, i in enumerate(idx):
            scores[i] = [logprobs[row, mlm.word(c)].item() for c in examples[i].candidates]
        if progress is not None:
            progress(len(idx))
    return scores
