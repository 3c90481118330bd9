"""Loss on answer tokens only; candidate scoring: shared-prompt shortcut and batching change nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoexp.scoring import Encoder, classification_requests, lm_loss, read_logprobs, score_candidates
from zoexp.tasks import Example

EXAMPLES = [
    Example(id=0, prompt="a gripping , beautifully acted drama It was", candidates=[" terrible", " great"], label=1),
    Example(id=1, prompt="dull It was", candidates=[" terrible", " great"], label=0),
    Example(id=2, prompt="The answer is", candidates=[" yes indeed", " no", " maybe so"], label=2),
]


def _manual_logprobs(model, ids: list[int], n_cont: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    return logp[torch.arange(len(targets)), targets][-n_cont:]


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama"])
def test_lm_loss_is_cross_entropy_on_answer_tokens_only(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    enc = Encoder(tok)
    expected = []
    for ex in EXAMPLES:
        ids, n = enc.encode(ex.prompt, ex.target)
        expected.append(_manual_logprobs(model, ids, n))
    with torch.no_grad():
        loss = lm_loss(model, enc, EXAMPLES, tok.pad_token_id)
    assert loss.item() == pytest.approx(-torch.cat(expected).mean().item(), rel=1e-5)


def test_continuation_split_uses_offsets(tiny_opt):
    _, tok = tiny_opt
    enc = Encoder(tok)
    ids, n = enc.encode("It was", " great")
    assert n == 1 and tok.decode(ids[-1:]) == " great"
    ids, n = enc.encode("The answer is", " yes indeed")
    assert tok.decode(ids[-n:]) == " yes indeed"


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_scores_equal_one_at_a_time(fixture, side, request):
    model, tok = request.getfixturevalue(fixture)
    enc = Encoder(tok)
    batched = score_candidates(model, enc, EXAMPLES, tok.pad_token_id, batch_size=8, side=side)
    for ex, scores in zip(EXAMPLES, batched):
        for c, cand in enumerate(ex.candidates):
            ids, n = enc.encode(ex.prompt, cand)
            single = _manual_logprobs(model, ids, n).mean().item()
            assert scores[c] == pytest.approx(single, abs=1e-4)


def test_single_token_candidates_share_one_request(tiny_opt):
    _, tok = tiny_opt
    enc = Encoder(tok)
    requests, kind = classification_requests(enc, EXAMPLES[0])
    assert kind == "shared" and len(requests) == 1 and len(requests[0].reads[0][1]) == 2
    requests, kind = classification_requests(enc, EXAMPLES[2])
    assert kind == "separate" and len(requests) == 3


def test_truncation_from_the_left_keeps_the_answer(tiny_opt):
    model, tok = tiny_opt
    enc = Encoder(tok, max_length=6)
    ids, n = enc.encode("one two three four five six seven eight nine ten It was", " great")
    assert len(ids) == 6 and tok.decode(ids[-1:]) == " great" and enc.truncated == 1
    out = read_logprobs(model, [enc.continuation_request("one two three four five six seven It was", " great")],
                        tok.pad_token_id)
    assert out[0][0].shape == (1,)
