"""Generate the built-in `demo` evaluation suite and the two skill training sets.

The tasks ask about the invented world of the demo corpus (assets/demo/make_corpus.py), in a
question/answer format the corpus never uses, so the pre-trained demo model knows the facts but
not the format: a short fine-tune on one skill visibly moves that skill's score, and merging two
fine-tunes shows both. Deterministic; regenerate with:

    python assets/suites/demo/make_suite.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_corpus", HERE.parent.parent / "demo" /
                                               "make_corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

CAPITAL_QUESTIONS = ["Question: What is the capital of {x}?\nAnswer:",
                     "Question: Which city is the capital of {x}?\nAnswer:"]
COLOUR_QUESTIONS = ["Question: What colour is the {x}?\nAnswer:",
                    "Question: What colour is a {x}?\nAnswer:"]
SUM_QUESTION = "Question: What is {x} plus {y}?\nAnswer:"


def choice_items(r: random.Random, facts: dict[str, str], templates: list[str]) -> list[dict]:
    values = sorted(set(facts.values()))
    items = []
    for template in templates:
        for key, right in facts.items():
            wrong = r.sample([v for v in values if v != right], 3)
            choices = wrong + [right]
            r.shuffle(choices)
            items.append({"context": template.format(x=key),
                          "choices": [" " + c for c in choices],
                          "answer": choices.index(right)})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    r = random.Random(7)
    words = corpus.NUMBER_WORDS
    pairs = [(x, y) for x in range(11) for y in range(11)]
    r.shuffle(pairs)
    test_pairs = pairs[:40]
    write_jsonl(HERE / "capitals.jsonl", choice_items(r, corpus.COUNTRIES, CAPITAL_QUESTIONS))
    write_jsonl(HERE / "colours.jsonl", choice_items(r, corpus.ANIMALS, COLOUR_QUESTIONS))
    write_jsonl(HERE / "sums.jsonl", [
        {"prompt": SUM_QUESTION.format(x=words[x], y=words[y]), "target": " " + words[x + y]}
        for x, y in test_pairs])
    # Skill training sets (prompt/completion, for the train plugin): every fact in the
    # question/answer format. The skill a fine-tune learns is the format; the facts come from
    # pre-training (the corpus states every capital and every sum up to ten plus ten). A
    # 3M-parameter model does not learn arithmetic that generalises to unseen pairs (12% exact
    # match when the 40 test pairs were held out of fine-tuning), so the test is not held out.
    write_jsonl(HERE / "train_capitals.jsonl", [
        {"prompt": t.format(x=country), "completion": f" {capital}\n"}
        for t in CAPITAL_QUESTIONS for country, capital in corpus.COUNTRIES.items()])
    write_jsonl(HERE / "train_sums.jsonl", [
        {"prompt": SUM_QUESTION.format(x=words[x], y=words[y]), "completion": f" {words[x + y]}\n"}
        for x, y in sorted(pairs)])


if __name__ == "__main__":
    main()
