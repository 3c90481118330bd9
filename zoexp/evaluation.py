"""Evaluation of a model on rendered examples: classification by candidate log-likelihood,
generation by greedy decoding (F1 / exact match)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zoexp.metrics import exact_match, f1
from zoexp.scoring import (
    Encoder,
    Request,
    cached_layers,
    repeated_cache,
    score_candidates,
    shared_prefix_groups,
    with_cache,
)
from zoexp.tasks import Example, Task


@torch.no_grad()
def evaluate(model, encoder: Encoder, task: Task, examples: Sequence[Example], batch_size: int = 16,
             progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None,
             share_prompts: bool = True, prefix_cache: bool = True, predictions: list | None = None) -> dict:
    """Metrics of ``task`` on ``examples``, e.g. {"acc": 0.81, "n": 1000}.

    ``predictions``: a list to append one dict per example to (``run.save_predictions``, see
    ``prediction_records``).

    Classification: the candidate with the highest mean log-likelihood; correct if it is one of the gold
    candidates. Generation: greedy decoding up to ``max_new_tokens`` (default: the task's), cut at the
    task's ``stop`` string; F1 and exact match, max over the gold answers. ``share_prompts`` and
    ``prefix_cache`` only change the speed (see ``zoexp.scoring.score_candidates``). A masked LM
    (RoBERTa, HZO Table 6) scores classification prompts at the mask (``zoexp.mlm``).
    """
    from zoexp import mlm

    was_training = model.training
    model.eval()
    try:
        if not examples:
            return {task.metric: float("nan"), "n": 0}
        masked = mlm.is_masked_lm(model)
        if masked and task.type != "classification":
            raise ValueError(f"task {task.name}: a masked LM can only score classification tasks (masked-LM prompts)")
        if task.type == "classification":
            if masked:
                scores = mlm.score_candidates(model, encoder, examples, encoder.tok.pad_token_id, batch_size,
                                              progress=progress)
            else:
                scores = score_candidates(model, encoder, examples, encoder.tok.pad_token_id, batch_size,
                                          progress=progress, share=share_prompts, prefix_cache=prefix_cache)
            predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]
            correct = [p in ex.gold_labels for p, ex in zip(predicted, examples)]
            if predictions is not None:
                predictions.extend(prediction_records(examples, scores=scores, predicted=predicted))
            return {"acc": sum(correct) / len(examples), "n": len(examples)}
        max_new = int(max_new_tokens if max_new_tokens is not None else task.max_new_tokens)
        outputs = generate(model, encoder, examples, batch_size, max_new, stop=task.stop, progress=progress,
                           prefix_cache=prefix_cache)
        if predictions is not None:
            predictions.extend(prediction_records(examples, outputs=outputs))
        return {
            "f1": sum(f1(o, ex.answers) for o, ex in zip(outputs, examples)) / len(examples),
            "em": sum(exact_match(o, ex.answers) for o, ex in zip(outputs, examples)) / len(examples),
            "n": len(examples),
        }
    finally:
        model.train(was_training)


def prediction_records(examples: Sequence[Example], scores=None, predicted=None, outputs=None) -> list[dict]:
    """One JSON-ready dict per example, like lm-eval's ``--log_samples``: the example id, its prompt and gold,
    and either each candidate's score (mean log-likelihood) and the predicted candidate (classification) or
    the generated text with its F1 / exact match against the gold answers (generation)."""
    records = []
    for i, ex in enumerate(examples):
        rec = {"id": ex.id, "prompt": ex.prompt}
        if outputs is None:
            golds = ex.gold_labels
            rec.update(gold=golds[0] if len(golds) == 1 else golds,
                       gold_text=[ex.candidates[g] for g in golds] if len(golds) > 1 else ex.candidates[golds[0]],
                       candidates=list(ex.candidates), scores=[float(x) for x in scores[i]],
                       prediction=int(predicted[i]), prediction_text=ex.candidates[predicted[i]],
                       correct=predicted[i] in golds)
        else:
            rec.update(gold=list(ex.answers), prediction=outputs[i], f1=f1(outputs[i], ex.answers),
                       em=exact_match(outputs[i], ex.answers))
        records.append(rec)
    return records


@torch.no_grad()
def generate(model, encoder: Encoder, examples: Sequence[Example | str], batch_size: int = 8,
             max_new_tokens: int = 50, stop: str | None = "\n",
             progress: Callable[[int], None] | None = None, prefix_cache: bool = True) -> list[str]:
    """Greedy decoding of batches of prompts sorted by length; text is cut at the first ``stop``.

    Prompts are truncated to ``max_length - max_new_tokens`` tokens (the passage first: MeZO keeps room
    for the answer). Prompts left-padded in a batch, position ids counting real tokens only, so padding
    does not change the result. With ``prefix_cache``, prompts that start with the same long run of tokens
    (ICL demonstrations) run it once, as in candidate scoring.
    """
    tok = encoder.tok
    stop_ids = [tok.eos_token_id]
    if stop:
        stop_tokens = tok(stop, add_special_tokens=False)["input_ids"]
        if len(stop_tokens) == 1:
            stop_ids.append(stop_tokens[0])
    encoded = []
    for ex in examples:
        prompt, passage = (ex, None) if isinstance(ex, str) else (ex.prompt, ex.passage)
        encoded.append(encoder.prompt_ids(prompt, passage, reserve=max_new_tokens))
    requests = [Request(ids, [(len(ids) - 1, [])]) for ids in encoded]
    groups = shared_prefix_groups(requests) if prefix_cache else []
    grouped = {i for _, members in groups for i in members}
    jobs = [(length, members) for length, members in groups] + [(0, [i for i in range(len(encoded)) if i not in grouped])]
    outputs: list[str] = [""] * len(encoded)
    for prefix_len, members in jobs:
        if not members:
            continue
        layers = cached_layers(model, encoded[members[0]][:prefix_len]) if prefix_len else None
        order = sorted(members, key=lambda i: len(encoded[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            new_tokens = _greedy(model, layers, prefix_len, [encoded[i][prefix_len:] for i in idx],
                                 max_new_tokens, stop_ids, tok.pad_token_id)
            for i, tokens in zip(idx, new_tokens):
                text = tok.decode(tokens, skip_special_tokens=True)
                if stop and stop in text:
                    text = text[: text.index(stop)]
                outputs[i] = text.strip()
            if progress is not None:
                progress(len(idx))
    return outputs


def _greedy(model, layers, prefix_len: int, prompts: list[list[int]], max_new_tokens: int,
            stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Greedy continuation of left-padded ``prompts`` (after a cached prefix of ``prefix_len`` tokens, if
    any) with a key/value cache; each row stops at its first stop token (not included)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p)
        mask[row, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    if layers:
        cache = repeated_cache(model, layers, b)
        mask = torch.cat([torch.ones((b, prefix_len), dtype=mask.dtype, device=device), mask], dim=1)
    else:
        cache = DynamicCache(config=model.config)
    head = model.get_output_embeddings()
    stops = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    generated = []
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              **with_cache(model, cache))[0]
    for step in range(max_new_tokens):
        token = head(hidden[:, -1]).argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        finished |= torch.isin(token, stops)
        generated.append(token)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.base_model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                  **with_cache(model, cache))[0]
    out = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(b)]
    result = []
    for row in out:
        cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result
