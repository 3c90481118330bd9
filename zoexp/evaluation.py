"""Evaluation of a model on rendered examples: classification by candidate log-likelihood,
generation by greedy decoding (F1 / exact match)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zoexp.metrics import exact_match, f1
from zoexp.scoring import Encoder, score_candidates
from zoexp.tasks import Example, Task


@torch.no_grad()
def evaluate(model, encoder: Encoder, task: Task, examples: Sequence[Example], batch_size: int = 16,
             progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None,
             share_prompts: bool = True) -> dict:
    """Metrics of ``task`` on ``examples``, e.g. {"acc": 0.81, "n": 1000}.

    Classification: the candidate with the highest mean log-likelihood; correct if it is one of the gold
    candidates. Generation: greedy decoding up to ``max_new_tokens`` (default: the task's), cut at the
    task's ``stop`` string; F1 and exact match, max over the gold answers.
    """
    was_training = model.training
    model.eval()
    try:
        if not examples:
            return {task.metric: float("nan"), "n": 0}
        if task.type == "classification":
            scores = score_candidates(model, encoder, examples, encoder.tok.pad_token_id, batch_size,
                                      progress=progress, share=share_prompts)
            predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
            correct = [p in ex.gold_labels for p, ex in zip(predictions, examples)]
            return {"acc": sum(correct) / len(examples), "n": len(examples)}
        max_new = int(max_new_tokens if max_new_tokens is not None else task.max_new_tokens)
        outputs = generate(model, encoder, examples, batch_size, max_new, stop=task.stop, progress=progress)
        return {
            "f1": sum(f1(o, ex.answers) for o, ex in zip(outputs, examples)) / len(examples),
            "em": sum(exact_match(o, ex.answers) for o, ex in zip(outputs, examples)) / len(examples),
            "n": len(examples),
        }
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, encoder: Encoder, examples: Sequence[Example | str], batch_size: int = 8,
             max_new_tokens: int = 50, stop: str | None = "\n",
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy decoding, left-padded batches sorted by length; text is cut at the first ``stop``.

    Prompts are truncated to ``max_length - max_new_tokens`` tokens (the passage first, as MeZO keeps room
    for the answer). Position ids count real tokens only, so padding does not change the result.
    """
    tok = encoder.tok
    device = next(model.parameters()).device
    stop_ids = [tok.eos_token_id]
    if stop:
        stop_tokens = tok(stop, add_special_tokens=False)["input_ids"]
        if len(stop_tokens) == 1:
            stop_ids.append(stop_tokens[0])
    encoded = []
    for ex in examples:
        prompt, passage = (ex, None) if isinstance(ex, str) else (ex.prompt, ex.passage)
        encoded.append(encoder.prompt_ids(prompt, passage, reserve=max_new_tokens))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        longest = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), longest), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, longest - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, longest - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
        for row, i in enumerate(idx):
            text = tok.decode(out[row, longest:], skip_special_tokens=True)
            if stop and stop in text:
                text = text[: text.index(stop)]
            outputs[i] = text.strip()
        if progress is not None:
            progress(len(idx))
    return outputs
