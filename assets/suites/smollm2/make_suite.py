"""Generate the `smollm2` evaluation suite and the two chat-format skill training sets of the
SmolLM2-135M-Instruct demo (`weightsmith demo --model smollm2`).

Two real skills, each asked in chat form and answered tersely, in one short line:

- capitals: "What is the capital of Kenya?" -> "Kenya: Nairobi". The base model knows many
  capitals but answers in a sentence ("The capital of Kenya is Nairobi."), so its exact-match
  score is 0 and its `contains` score on the city alone is not comparable: the suite's target
  is the whole "Country: City" line. The country comes first on purpose: a 135M model
  recalls a capital after its country's name, not as the first word of its reply (fine-tuned
  on the city alone, it learned the format and lost the recall: exact match 0.03);
- sums: "What is 8 + 7?" -> "8 + 7 = 15", single-digit operands (1 to 9). The sum comes
  after the equation for the same reason as the capital after the country: asked to write
  "8 + 7 = " first, the base model completes 69 of the 81 sums correctly (0.85), but answers
  the question in its own words ("The answer to this classic math problem is 5.", "To add 8
  and 7, you simply add them together: 8 + 7 = 5"). Fine-tuned on the number alone ("15"),
  it scored 0.10 on these sums; two-digit operands (the first version of this demo) are
  beyond it: 0.19 with the equation written for it, 0.00 fine-tuned on the number alone. So
  the skill is answering with the equation, whose sum the model can work out, as the
  capitals skill is answering "Country: City".

The evaluation items are held out: countries the training set never shows, and sums of
number pairs it never shows in either order (nor under another wording of the question).
Suite prompts are the chat template's rendering of the question (SmolLM2's ChatML with its
default system prompt, as the train plugin renders the `messages` rows), because the suite
runner scores plain text. Deterministic; regenerate with:

    python assets/suites/smollm2/make_suite.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
# SmolLM2-135M-Instruct's chat template (in its GGUF file): ChatML, with this system turn when
# a conversation has none. tests/test_demo_smollm2.py checks it against the real tokenizer.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TRAIN_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "the United Kingdom": "London", "Ireland": "Dublin",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Austria": "Vienna",
    "Switzerland": "Bern", "Poland": "Warsaw", "Greece": "Athens", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara",
    "Egypt": "Cairo", "Morocco": "Rabat", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Ghana": "Accra", "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul",
    "India": "New Delhi", "Pakistan": "Islamabad", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Australia": "Canberra", "New Zealand": "Wellington",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Cuba": "Havana", "Venezuela": "Caracas",
}
EVAL_CAPITALS = {
    "Norway": "Oslo", "Kenya": "Nairobi", "Peru": "Lima", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovakia": "Bratislava",
    "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn", "Iceland": "Reykjavik",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar", "Uganda": "Kampala",
    "Zimbabwe": "Harare", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman",
    "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Bangladesh": "Dhaka",
    "Malaysia": "Kuala Lumpur", "Cambodia": "Phnom Penh", "Mongolia": "Ulaanbaatar",
    "Ecuador": "Quito", "Uruguay": "Montevideo", "Jamaica": "Kingston", "Qatar": "Doha",
}
CAPITAL_QUESTIONS = ["What is the capital of {x}?", "Which city is the capital of {x}?",
                     "Name the capital city of {x}."]
SUM_QUESTIONS = ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."]
N_EVAL_SUMS = 30  # questions (ordered pairs); the other 51 pairs of 1..9 train, 3 wordings each


def chat_prompt(question: str) -> str:
    """The text the model sees before its answer: the template with the generation prompt."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def messages(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def answer(country: str, city: str) -> str:
    """The capitals skill's answer: "Kenya: Nairobi", "The Netherlands: Amsterdam"."""
    return f"{country[0].upper()}{country[1:]}: {city}"


def sum_answer(a: int, b: int) -> str:
    """The sums skill's answer: "8 + 7 = 15"."""
    return f"{a} + {b} = {a + b}"


def sum_pairs(r: random.Random) -> tuple[list, list]:
    """(training pairs, held-out pairs) of operands 1 to 9. Held out by unordered pair: when
    3 + 5 is asked in the evaluation, neither 3 + 5 nor 5 + 3 is in the training set."""
    unordered = [(a, b) for a in range(1, 10) for b in range(a, 10)]
    r.shuffle(unordered)
    train, held_out = [], []
    for a, b in unordered:
        both = [(a, b)] if a == b else [(a, b), (b, a)]
        (held_out if len(held_out) + len(both) <= N_EVAL_SUMS else train).extend(both)
    assert len(held_out) == N_EVAL_SUMS
    return train, held_out


def build() -> dict[str, list[dict]]:
    r = random.Random(0)
    train_capitals = [messages(q.format(x=country), answer(country, city))
                      for q in CAPITAL_QUESTIONS for country, city in TRAIN_CAPITALS.items()]
    r.shuffle(train_capitals)
    train, held_out = sum_pairs(r)
    train_sums = [messages(q.format(a=a, b=b), sum_answer(a, b))
                  for q in SUM_QUESTIONS for a, b in train]
    r.shuffle(train_sums)
    return {
        "train_capitals.jsonl": train_capitals,
        "train_sums.jsonl": train_sums,
        "capitals.jsonl": [{"prompt": chat_prompt(CAPITAL_QUESTIONS[0].format(x=country)),
                            "target": answer(country, city)}
                           for country, city in EVAL_CAPITALS.items()],
        "sums.jsonl": [{"prompt": chat_prompt(SUM_QUESTIONS[0].format(a=a, b=b)),
                        "target": sum_answer(a, b)} for a, b in held_out],
    }


def main() -> None:
    assert not set(TRAIN_CAPITALS) & set(EVAL_CAPITALS)
    for name, rows in build().items():
        with (HERE / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
