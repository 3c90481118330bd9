"""In-context learning: k demonstrations from the train sample in front of every evaluated example.

As MeZO (``large_models/utils.py: encode_prompt``): a demonstration is the example's prompt followed by
its gold answer (the gold candidate, or a generation task's target), stripped; demonstrations are joined
by ``"\\n\\n"`` (MeZO's ``train_sep``) and followed by the same separator and the evaluated prompt. The
same k demonstrations (the first k of the seed's train sample, i.e. MeZO's ``sample_subset(seed, k)``)
serve every evaluated example.

Too long: the evaluated example is kept whole; demonstrations are dropped from the front (MeZO truncates
the joined text from the left) until the longest candidate fits ``max_length`` (minus the tokens kept
free for generation). Only if no demonstration is left does the encoder cut the example's passage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from zoexp.scoring import Encoder
from zoexp.tasks import Example

SEPARATOR = "\n\n"


def demonstration_text(ex: Example) -> str:
    return (ex.prompt + ex.target).strip()


def with_demonstrations(encoder: Encoder, examples: Sequence[Example], demos: Sequence[Example],
                        sep: str = SEPARATOR, reserve: int = 0) -> tuple[list[Example], dict]:
    """``examples`` with as many of ``demos`` as fit prepended, and statistics for the result row."""
    texts = [demonstration_text(d) for d in demos]
    lengths = [len(encoder.tok(t + sep, add_special_tokens=False)["input_ids"]) for t in texts]
    limit = encoder.max_length - reserve
    out, used = [], []
    for ex in examples:
        budget = limit - _longest(encoder, ex.prompt, ex)
        k, total = len(texts), sum(lengths)
        while k and total > budget:  # drop from the front
            total -= lengths[len(texts) - k]
            k -= 1
        while True:
            prefix = sep.join(texts[len(texts) - k:]) + sep if k else ""
            if k == 0 or _longest(encoder, prefix + ex.prompt, ex) <= limit:
                break
            k -= 1  # token merges at the joins made it a little longer than the estimate
        passage = None if ex.passage is None else (ex.passage[0] + len(prefix), ex.passage[1] + len(prefix))
        out.append(replace(ex, prompt=prefix + ex.prompt, passage=passage))
        used.append(k)
    stats = {
        "icl/demonstrations": len(texts),
        "icl/demonstrations_mean": sum(used) / len(used) if used else None,
        "icl/demonstrations_min": min(used) if used else None,
        "icl/examples_with_fewer_demos": sum(1 for k in used if k < len(texts)),
    }
    return out, stats


def _longest(encoder: Encoder, prompt: str, ex: Example) -> int:
    """Tokens of ``prompt`` followed by the longest of ``ex``'s candidates (generation: the prompt alone)."""
    return max(encoder.length(prompt, c) for c in (ex.candidates or [""]))
