"""Evaluation of a model on rendered examples: classification by candidate log-likelihood,
generation by greedy decoding (F1 / exact match)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zoexp.metrics import accuracy, exact_match, f1
from zoexp.scoring import Encoder, score_candidates
from zoexp.tasks import Example, Task


@torch.no_grad()
def evaluate(model, encoder: Encoder, task: Task, examples: Sequence[Example], batch_size: int = 16,
             progress: Callable[[int], None] | None = None, max_new_tokens: int = 50) -> dict:
    """Metrics of ``task`` on ``examples``, e.g. {"acc": 0.81, "n": 1000}."""
    from zoexp import mlm

    was_training = model.training
    model.eval()
    try:
        if mlm.is_masked_lm(model) and task.type != "classification":
            raise ValueError(f"task {task.name}: a masked LM can only score classification tasks (masked-LM prompts)")
        if task.type == "classification":
            score = mlm.score_candidates if mlm.is_masked_lm(model) else score_candidates
            scores = score(model, encoder, examples, encoder.tok.pad_token_id, batch_size, progress=progress)
            predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
            return {"acc": accuracy(predictions, [ex.label for ex in examples]), "n": len(examples)}
        outputs = generate(model, encoder, [ex.prompt for ex in examples], batch_size, max_new_tokens,
                           stop=task.spec.get("stop", "\n"), progress=progress)
        return {
            "f1": sum(f1(o, ex.answers) for o, ex in zip(outputs, examples)) / max(len(examples), 1),
            "em": sum(exact_match(o, ex.answers) for o, ex in zip(outputs, examples)) / max(len(examples), 1),
            "n": len(examples),
        }
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, encoder: Encoder, prompts: Sequence[str], batch_size: int = 8, max_new_tokens: int = 50,
             stop: str | None = "\n", progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy decoding, left-padded batches sorted by length; text is cut at the first ``stop``."""
    tok = encoder.tok
    device = next(model.parameters()).device
    stop_ids = [tok.eos_token_id]
    if stop:
        stop_tokens = tok(stop, add_special_tokens=False)["input_ids"]
        if len(stop_tokens) == 1:
            stop_ids.append(stop_tokens[0])
    encoded = [encoder.prompt_ids(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
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
