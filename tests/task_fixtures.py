"""One hand-written row per task (Hugging Face field names) with the prompt and candidates its spec must
render, character for character, and helpers that write small data folders for the loaders."""

from __future__ import annotations

import json
from pathlib import Path

YES_NO_MAYBE = ["Yes", "No", "Maybe"]

# task -> (row, expected prompt, expected candidates (classification) or answers (generation),
#          expected label, expected training target)
GOLDEN = {
    "sst2": (
        {"idx": 0, "sentence": "a gripping , beautifully acted drama ", "label": 1},
        "a gripping , beautifully acted drama It was",
        [" terrible", " great"], 1, " great",
    ),
    "sst5": (
        {"idx": 0, "sentence": "no movement , no yuks , not much of anything .", "label": 1},
        "no movement , no yuks , not much of anything . It was",
        [" terrible", " bad", " okay", " good", " great"], 1, " bad",
    ),
    "rte": (
        {"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "idx": 0, "label": 0},
        'The cat sat on the mat.\nDoes this mean that "A cat is sitting." is true? Yes or No?\n',
        ["Yes", "No"], 0, "Yes",
    ),
    "cb": (
        {"premise": "It was a complex language.", "hypothesis": "the language was complex", "idx": 0, "label": 2},
        'Suppose It was a complex language. Can we infer that "the language was complex"? Yes, No, or Maybe?\n',
        YES_NO_MAYBE, 2, "Maybe",
    ),
    "boolq": (
        {"question": "is the sky blue", "passage": "Sky -- The sky is blue on a clear day.", "idx": 3, "label": 1},
        "Sky -- The sky is blue on a clear day. Is the sky blue?\n",
        ["Yes", "No"], 0, "Yes",
    ),
    "wsc": (
        {"text": "Mark told Pete many lies about himself. He should have been more skeptical.",
         "span1_index": 2, "span2_index": 7, "span1_text": "Pete", "span2_text": "He", "idx": 0, "label": 1},
        "Mark told Pete many lies about himself. He should have been more skeptical.\n"
        'In the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\n',
        ["No", "Yes"], 1, "Yes",
    ),
    "wic": (
        {"word": "class", "sentence1": "An emerging professional class.", "sentence2": "She showed real class.",
         "start1": 25, "start2": 17, "end1": 30, "end2": 22, "idx": 0, "label": 0},
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        "An emerging professional class.\nShe showed real class.\n",
        ["No", "Yes"], 0, "No",
    ),
    "multirc": (
        {"paragraph": "Forces cause changes in motion.", "question": "What causes a change in motion?",
         "answer": "A force", "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1},
        "Forces cause changes in motion.\nQuestion: What causes a change in motion?\n"
        'I found this answer "A force". Is that correct? Yes or No?\n',
        ["No", "Yes"], 1, "Yes",
    ),
    "copa": (
        {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
         "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0},
        "My body cast a shadow over the grass because",
        [" the sun was rising.", " the grass was cut."], 0, " the sun was rising.",
    ),
    "record": (
        {"passage": "Tokyo hosts the games.\n@highlight\nJapan wins gold\n@highlight\nRecord crowd",
         "query": "@placeholder celebrated the win.", "entities": ["Tokyo", "Japan", "Japan"],
         "entity_spans": {"text": ["Tokyo", "Japan", "Japan"], "start": [0, 34, 60], "end": [5, 39, 65]},
         "answers": ["Japan"], "idx": {"passage": 0, "query": 0}},
        "Tokyo hosts the games.\n- Japan wins gold\n- Record crowd\n-",
        [" Tokyo celebrated the win.", " Japan celebrated the win."], 1, " Japan celebrated the win.",
    ),
    "squad": (
        {"id": "q1", "title": "Super_Bowl_50", "context": "The Denver Broncos won the game.",
         "question": "Who won the game? ",
         "answers": {"text": ["Denver Broncos", "The Denver Broncos"], "answer_start": [4, 0]}},
        "Title: Super_Bowl_50\nContext: The Denver Broncos won the game.\nQuestion: Who won the game?\nAnswer:",
        ["Denver Broncos", "The Denver Broncos"], None, " Denver Broncos\n",
    ),
    "drop": (
        {"section_id": "nfl_1", "query_id": "q1", "passage": "The Bears scored 7 points. The Lions scored 3.",
         "question": "How many more points did the Bears score? ",
         "answers_spans": {"spans": ["4"], "types": ["number"]}},
        "Passage: The Bears scored 7 points. The Lions scored 3.\n"
        "Question: How many more points did the Bears score?\nAnswer:",
        ["4"], None, " 4\n",
    ),
    "snli": (
        {"premise": "Two women are embracing.", "hypothesis": "The sisters are hugging.", "label": 1},
        "Two women are embracing?",
        [" Yes, the sisters are hugging.", " Maybe, the sisters are hugging.", " No, the sisters are hugging."],
        1, " Maybe, the sisters are hugging.",
    ),
    "mnli": (
        {"premise": "The new rights are nice enough", "hypothesis": "Everyone really likes the newest benefits ",
         "label": 2, "idx": 0},
        "The new rights are nice enough?",
        [" Yes, everyone really likes the newest benefits", " Maybe, everyone really likes the newest benefits",
         " No, everyone really likes the newest benefits"], 2, " No, everyone really likes the newest benefits",
    ),
    "trec": (
        {"idx": 0, "text": "How far is it from Denver to Aspen ?", "coarse_label": 5, "coarse_label_text": "NUM"},
        "",
        [f"{w}: How far is it from Denver to Aspen ?"
         for w in ("Expression", "Entity", "Description", "Human", "Location", "Number")], 5,
        "Number: How far is it from Denver to Aspen ?",
    ),
}


def variants(task: str, n: int) -> list[dict]:
    """``n`` distinct rows of ``task`` (the golden row with a numbered text field and alternating labels)."""
    row0 = GOLDEN[task][0]
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(row0))
        if "idx" in row and isinstance(row["idx"], int):
            row["idx"] = i
        text_key = next(k for k in ("sentence", "premise", "passage", "paragraph", "text", "context", "sentence1")
                        if k in row)
        row[text_key] = f"{row[text_key]} ({i})"
        if "label" in row:
            row["label"] = i % (2 if task == "boolq" else len(GOLDEN[task][2]))
        if "coarse_label" in row:
            row["coarse_label"] = i % 6
        if task == "squad":
            row["id"] = f"q{i}"
        if task == "drop":
            row["query_id"] = f"q{i}"
        rows.append(row)
    return rows


def write_split(root: Path, task: str, split: str, rows: list[dict], fmt: str = "jsonl") -> Path:
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        raise ValueError(fmt)
    return path
