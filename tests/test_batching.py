"""Batched scoring and generation equal one-at-a-time (MeZO's loop); passage truncation; the
classification loss; in-context demonstrations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from task_fixtures import GOLDEN

from zoexp.evaluation import evaluate, generate
from zoexp.icl import with_demonstrations
from zoexp.scoring import Encoder, classification_loss, score_candidates
from zoexp.tasks import Task, load_spec

SCORED = ["sst2", "cb", "copa", "record", "trec", "boolq"]  # shared prompt, multi-token, empty prompt, passage
_REFERENCE: dict = {}


def _examples(names=SCORED):
    return [Task(load_spec(n)).render(GOLDEN[n][0]) for n in names]


def _one_forward_per_candidate(model, enc: Encoder, ex, cand: str) -> float:
    """MeZO's loop: the full sequence of one candidate, batch size 1, log-probs of its tokens, mean."""
    ids, n = enc.encode(ex.prompt, cand, ex.passage)
    key = (id(model), tuple(ids), n)
    if key not in _REFERENCE:
        _REFERENCE[key] = _forward_mean(model, ids, n)
    return _REFERENCE[key]


def _forward_mean(model, ids: list[int], n: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][-n:].mean().item()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("share", [True, False])
def test_batched_candidate_scores_equal_one_forward_per_candidate(tiny_llama, side, share):
    model, tok = tiny_llama
    enc = Encoder(tok)
    examples = _examples()
    batched = score_candidates(model, enc, examples, tok.pad_token_id, batch_size=7, side=side, share=share)
    for ex, scores in zip(examples, batched):
        assert len(scores) == len(ex.candidates)
        for c, cand in enumerate(ex.candidates):
            assert scores[c] == pytest.approx(_one_forward_per_candidate(model, enc, ex, cand), abs=1e-4)


def test_mezo_style_loop_gives_the_same_predictions(tiny_opt):
    model, tok = tiny_opt
    task = Task(load_spec("copa"))
    examples = _examples(["copa"] * 3 + ["rte"] * 2)
    fast = score_candidates(model, Encoder(tok), examples, tok.pad_token_id, batch_size=16)
    slow = score_candidates(model, Encoder(tok), examples, tok.pad_token_id, batch_size=1, share=False)
    assert [s for row in fast for s in row] == pytest.approx([s for row in slow for s in row], abs=1e-4)
    assert evaluate(model, Encoder(tok), task, examples[:3])["n"] == 3


def test_empty_prompt_starts_from_the_start_token(tiny_llama):
    _, tok = tiny_llama
    ids, n = Encoder(tok).encode("", "Number: How far is it ?")
    assert ids[0] == tok.bos_token_id and n == len(ids) - 1


def test_passage_is_cut_from_its_left_and_the_question_stays(tiny_llama):
    _, tok = tiny_llama
    task = Task(load_spec("boolq"))
    long_passage = " ".join(f"word{i}" for i in range(200)) + " The sky is blue."
    ex = task.render({"question": "is the sky blue", "passage": long_passage, "label": 1})
    full, _ = Encoder(tok).encode(ex.prompt, "Yes", ex.passage)
    enc = Encoder(tok, max_length=60)
    ids, n = enc.encode(ex.prompt, "Yes", ex.passage)
    assert len(ids) <= 60 and len(full) > 60 and enc.truncated == 1
    text = tok.decode(ids)
    assert text.endswith("The sky is blue. Is the sky blue?\nYes")  # question and answer intact
    assert "word0 " not in text and "word199" in text                 # the passage lost its beginning
    # candidates of the same example count once; prompts without a passage lose their left end
    enc.encode(ex.prompt, "No", ex.passage)
    assert enc.truncated == 1
    plain, _ = enc.encode("x " * 100 + "It was", " great")
    assert len(plain) == 60 and tok.decode(plain[-1:]) == " great" and enc.truncated == 2


def test_generation_prompt_keeps_room_for_new_tokens(tiny_llama):
    _, tok = tiny_llama
    task = Task(load_spec("squad"))
    row = dict(GOLDEN["squad"][0], context=" ".join(f"w{i}" for i in range(300)))
    ex = task.render(row)
    ids = Encoder(tok, max_length=100).prompt_ids(ex.prompt, ex.passage, reserve=30)
    text = tok.decode(ids)
    assert len(ids) <= 70 and text.startswith("Title: Super_Bowl_50\nContext:")
    assert text.endswith("w299\nQuestion: Who won the game?\nAnswer:")


def test_classification_loss_is_cross_entropy_over_candidate_scores(tiny_llama):
    model, tok = tiny_llama
    enc = Encoder(tok)
    batch = _examples(["rte", "copa", "cb", "trec"])
    with torch.no_grad():
        loss = classification_loss(model, enc, batch, tok.pad_token_id)
    scores = score_candidates(model, enc, batch, tok.pad_token_id)
    expected = sum(-F.log_softmax(torch.tensor(s), -1)[ex.label].item() for s, ex in zip(scores, batch)) / len(batch)
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_classification_loss_has_gradients(tiny_opt):
    model, tok = tiny_opt
    loss = classification_loss(model, Encoder(tok), _examples(["copa", "rte"]), tok.pad_token_id)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def _peaked(model):
    """A copy of the tiny model whose next-token distribution is sharp (no near-ties for greedy decoding)."""
    import copy

    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.get_output_embeddings().weight.mul_(40.0)
    return peaked


def test_batched_generation_equals_one_at_a_time(tiny_llama):
    model, tok = tiny_llama
    model = _peaked(model)
    prompts = ["Title: A\nContext: short.\nQuestion: who?\nAnswer:",
               "Passage: a much longer passage with many more words in it than the first one.\nQuestion: what?\nAnswer:",
               "x", "Question: how many?\nAnswer:"]
    enc = Encoder(tok)
    batched = generate(model, enc, prompts, batch_size=4, max_new_tokens=8, stop=None)
    single = [generate(model, enc, [p], batch_size=1, max_new_tokens=8, stop=None)[0] for p in prompts]
    assert batched == single
    assert any(batched)


def test_generation_evaluation_reports_f1_and_em(tiny_llama):
    model, tok = tiny_llama
    task = Task(load_spec("drop"))
    ex = task.render(GOLDEN["drop"][0])
    result = evaluate(model, Encoder(tok), task, [ex, ex], batch_size=2, max_new_tokens=4)
    assert set(result) == {"f1", "em", "n"} and result["n"] == 2 and 0 <= result["f1"] <= 1


# --------------------------------------------------------------------------- in-context learning


def test_demonstrations_are_prompt_plus_gold_joined_by_blank_lines(tiny_llama):
    _, tok = tiny_llama
    task = Task(load_spec("sst2"))
    demos = [task.render({"sentence": "great fun ", "label": 1}), task.render({"sentence": "a bore ", "label": 0})]
    test = task.render({"sentence": "moving ", "label": 1})
    (out,), stats = with_demonstrations(Encoder(tok), [test], demos)
    assert out.prompt == "great fun It was great\n\na bore It was terrible\n\nmoving It was"
    assert out.candidates == test.candidates and stats["icl/demonstrations_mean"] == 2


def test_generation_demonstrations_use_the_gold_answer_and_shift_the_passage(tiny_llama):
    _, tok = tiny_llama
    task = Task(load_spec("squad"))
    demo = task.render(GOLDEN["squad"][0])
    test = task.render(dict(GOLDEN["squad"][0], question="Who lost?"))
    (out,), _ = with_demonstrations(Encoder(tok), [test], [demo], reserve=10)
    first = "Title: Super_Bowl_50\nContext: The Denver Broncos won the game.\nQuestion: Who won the game?\nAnswer: Denver Broncos"
    assert out.prompt == first + "\n\n" + test.prompt
    start, end = out.passage
    assert out.prompt[start:end] == "The Denver Broncos won the game."


def test_demonstrations_are_dropped_from_the_front_to_fit(tiny_llama):
    _, tok = tiny_llama
    task = Task(load_spec("rte"))
    demos = [task.render({"premise": f"Premise number {i} " + "long " * 10, "hypothesis": "h.", "label": i % 2})
             for i in range(6)]
    test = task.render(GOLDEN["rte"][0])
    enc = Encoder(tok, max_length=80)
    (out,), stats = with_demonstrations(enc, [test], demos)
    assert 0 < stats["icl/demonstrations_mean"] < 6 and stats["icl/examples_with_fewer_demos"] == 1
    assert out.prompt.endswith(test.prompt) and "Premise number 5" in out.prompt  # the last ones stay
    assert "Premise number 0" not in out.prompt
    assert max(len(enc.encode(out.prompt, c)[0]) for c in out.candidates) <= 80 and enc.truncated == 0


# --------------------------------------------------------------------------- shared-prefix cache


def _icl_examples():
    rte, copa, record = (Task(load_spec(n)) for n in ("rte", "copa", "record"))
    demos = [rte.render({"premise": f"Premise {i}: the cat sat on the mat near the door.",
                         "hypothesis": "A cat sat.", "label": i % 2}) for i in range(6)]
    tests = [rte.render({"premise": f"Test {i} premise.", "hypothesis": "Something.", "label": 0}) for i in range(5)]
    copas = [copa.render(GOLDEN["copa"][0]) for _ in range(2)]
    long_record = dict(GOLDEN["record"][0], passage=" ".join(f"w{i}" for i in range(80)) + "\n@highlight\nJapan wins",
                       entities=["Tokyo", "Japan", "Osaka", "Kyoto"])
    return demos, tests + copas, [record.render(long_record)]


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache is passed by the keyword the model takes
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_prefix_cache_gives_the_same_scores(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    demos, tests, records = _icl_examples()
    enc = Encoder(tok)
    with_demos, _ = with_demonstrations(enc, tests, demos)
    examples = with_demos + records
    cached = score_candidates(model, enc, examples, tok.pad_token_id, batch_size=3, prefix_cache=True)
    plain = score_candidates(model, enc, examples, tok.pad_token_id, batch_size=3, prefix_cache=False)
    assert [s for row in cached for s in row] == pytest.approx([s for row in plain for s in row], abs=1e-4)


def test_prefix_groups_cover_demonstrations_and_shared_passages(tiny_llama):
    from zoexp.scoring import classification_requests, shared_prefix_groups

    _, tok = tiny_llama
    demos, tests, records = _icl_examples()
    enc = Encoder(tok)
    with_demos, _ = with_demonstrations(enc, tests, demos)
    requests = [r for ex in with_demos + records for r in classification_requests(enc, ex)[0]]
    groups = shared_prefix_groups(requests)
    sizes = sorted(len(m) for _, m in groups)
    assert sizes == [4, 9]  # the ReCoRD candidates; 5 RTE + 2x2 COPA requests after the same demonstrations
    for length, members in groups:
        head = requests[members[0]].ids[:length]
        assert all(requests[i].ids[:length] == head and min(p for p, _ in requests[i].reads) >= length
                   for i in members)
    # short prompts share nothing worth caching
    assert shared_prefix_groups([r for ex in tests for r in classification_requests(enc, ex)[0]]) == []


def test_greedy_decoding_equals_transformers_generate(tiny_llama):
    model, tok = tiny_llama
    model = _peaked(model)
    prompt = "Passage: some words here.\nQuestion: what?\nAnswer:"
    ours = generate(model, Encoder(tok), [prompt], batch_size=1, max_new_tokens=6, stop=None)[0]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                         eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    assert ours == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.filterwarnings("error::FutureWarning")
def test_generation_with_a_cached_prefix_equals_without(tiny_llama):
    model, tok = tiny_llama
    model = _peaked(model)
    task = Task(load_spec("squad"))
    demos = [task.render(dict(GOLDEN["squad"][0], context=f"Demo {i}: " + "the game was played " * 8))
             for i in range(3)]
    tests = [task.render(dict(GOLDEN["squad"][0], question=q)) for q in ("Who won?", "Who lost the game?", "When?")]
    enc = Encoder(tok)
    examples, _ = with_demonstrations(enc, tests, demos, reserve=6)
    from zoexp.scoring import Request, shared_prefix_groups

    ids = [enc.prompt_ids(ex.prompt, ex.passage, reserve=6) for ex in examples]
    assert shared_prefix_groups([Request(i, [(len(i) - 1, [])]) for i in ids])  # the cache is exercised
    cached = generate(model, enc, examples, batch_size=2, max_new_tokens=6, stop=None, prefix_cache=True)
    plain = generate(model, enc, examples, batch_size=2, max_new_tokens=6, stop=None, prefix_cache=False)
    assert cached == plain and any(cached)


def test_the_cache_keyword_follows_the_forward_signature():
    """transformers 5 calls the key/value cache ``cache`` (``past_key_values`` goes in 5.40); older
    versions only know ``past_key_values``."""
    from types import SimpleNamespace

    from zoexp.scoring import with_cache

    class Before(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class After(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return input_ids

    assert with_cache(SimpleNamespace(base_model=Before()), "kv") == {"past_key_values": "kv", "use_cache": True}
    assert with_cache(SimpleNamespace(base_model=After()), "kv") == {"cache": "kv", "use_cache": True}
