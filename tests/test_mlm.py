"""Masked-LM prompts (HZO Table 6, RoBERTa): tiny-roberta, scoring at the mask against the full model's
logits, the LM-BFF loss over label words, the prompt templates, and k-shot sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from zoexp import mlm
from zoexp.models import param_groups
from zoexp.scoring import Encoder, lm_loss
from zoexp.tasks import Example, Task, load_spec

MLM_TASKS = ["sst2-mlm", "sst5-mlm", "snli-mlm", "mnli-mlm", "rte-mlm", "trec-mlm"]


@pytest.fixture(scope="module")
def tiny_roberta():
    from omegaconf import OmegaConf

    from zoexp.models import load_model

    torch.manual_seed(0)
    return load_model(OmegaConf.load(REPO / "conf" / "model" / "tiny-roberta.yaml"), "fp32", "cpu")


def examples() -> list[Example]:
    words = [" terrible", " great"]
    texts = ["a gripping drama It was<mask>.", "dull It was<mask>.", "one of the best films of the year , "
             "warm and wise It was<mask>."]
    return [Example(id=i, prompt=t, candidates=words, label=i % 2) for i, t in enumerate(texts)]


def test_tiny_roberta_is_a_masked_lm_with_blocks(tiny_roberta):
    model, tok = tiny_roberta
    assert mlm.is_masked_lm(model) and tok.mask_token == "<mask>" and tok.mask_token_id is not None
    groups = param_groups(model)
    roles = [g["role"] for g in groups]
    assert roles.count("block") == 4 and roles[0] == "embed" and "head" in roles
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names))  # the tied decoder weight appears once
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def _full_logits(model, enc, prompts, pad_id):
    encoded = [enc.prompt(p) for p in prompts]
    out = []
    for ids, pos in encoded:  # one at a time, no padding: the reference
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        out.append(logits[0, pos])
    return torch.stack(out)


def test_the_head_runs_only_at_the_mask_and_matches_the_full_model(tiny_roberta):
    model, tok = tiny_roberta
    enc = mlm.MaskedPromptEncoder(tok, 512, model.config)
    prompts = [ex.prompt for ex in examples()]
    ours = mlm.mask_logits(model, enc, prompts, tok.pad_token_id)
    torch.testing.assert_close(ours, _full_logits(model, enc, prompts, tok.pad_token_id), atol=1e-4, rtol=1e-4)


def test_scores_are_label_word_logprobs_and_the_loss_is_lmbff_cross_entropy(tiny_roberta):
    model, tok = tiny_roberta
    exs = examples()
    encoder = Encoder(tok, max_length=512)
    scores = mlm.score_candidates(model, encoder, exs, tok.pad_token_id, batch_size=2)
    enc = mlm.encoder_for(encoder, model)
    full = _full_logits(model, enc, [ex.prompt for ex in exs], tok.pad_token_id)
    words = [enc.word(w) for w in exs[0].candidates]
    expected = F.log_softmax(full, dim=-1)[:, words]
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-4, rtol=1e-4)
    loss = lm_loss(model, encoder, exs, tok.pad_token_id)  # the training loss hook dispatches to mlm
    ce = F.cross_entropy(full[:, words], torch.tensor([ex.label for ex in exs]))
    torch.testing.assert_close(loss, ce, atol=1e-4, rtol=1e-4)


def test_long_prompts_lose_text_before_the_mask_and_keep_it(tiny_roberta):
    model, tok = tiny_roberta
    enc = mlm.MaskedPromptEncoder(tok, 12, model.config)
    ids, pos = enc.prompt("word " * 40 + "It was<mask> . the end")
    assert len(ids) == 12 and ids[pos] == tok.mask_token_id and enc.truncated == 1
    assert tok.decode(ids[pos + 1:]).startswith(" .") or tok.decode(ids[pos + 1:]).startswith(".")
    with pytest.raises(ValueError, match="exactly one"):
        enc.prompt("no placeholder")
    with pytest.raises(ValueError, match="single-token"):
        enc.word(" antidisestablishmentarianism")


GOLDEN = {
    "sst2-mlm": ({"sentence": "a gripping , beautifully acted drama ", "label": 1},
                 "a gripping , beautifully acted drama It was<mask>.", 1),
    "rte-mlm": ({"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "label": 0},
                "The cat sat on the mat?<mask>, a cat is sitting.", 0),
    "snli-mlm": ({"premise": "Two women are embracing.", "hypothesis": "The sisters are hugging.", "label": 1},
                 "Two women are embracing?<mask>, the sisters are hugging.", 1),
    "trec-mlm": ({"text": "How far is it from Denver to Aspen ?", "coarse_label": 5},
                 "<mask>: How far is it from Denver to Aspen ?", 5),
}


@pytest.mark.parametrize("name", MLM_TASKS)
def test_masked_lm_task_specs_render_the_lmbff_templates(name):
    task = Task(load_spec(name))
    assert task.spec["k_shot"] == 16 and task.type == "classification"
    if name in GOLDEN:
        row, prompt, label = GOLDEN[name]
        ex = task.render(row)
        assert ex.prompt == prompt and ex.label == label
        assert all(c.startswith(" ") for c in ex.candidates)


def test_k_shot_takes_k_per_class_for_train_and_for_dev(data_dir):
    task = Task({**load_spec("sst2-mlm"), "k_shot": 4, "num_test": 10})
    a, b = task.sample(3, data_dir=data_dir), task.sample(3, data_dir=data_dir)
    assert [e.id for e in a.train] == [e.id for e in b.train]  # deterministic per seed
    for part in (a.train, a.dev):
        assert sorted(e.label for e in part) == [0] * 4 + [1] * 4
    assert not {e.id for e in a.train} & {e.id for e in a.dev}
    assert len(a.test) == 10
    c = Task({**load_spec("sst2-mlm"), "k_shot": 2, "num_test": 10}).sample(3, data_dir=data_dir)
    assert [e.id for e in c.test] == [e.id for e in a.test]  # the test set does not depend on k
    assert task.sample(4, data_dir=data_dir).train != a.train
