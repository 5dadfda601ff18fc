"""Generate the demo corpus: simple English text about a small invented world.

The text is generated (no copyright, no download) and deterministic. It mixes short stories,
facts about invented countries, animals and people, and arithmetic sentences, so a tiny model
learns visible structure in a minute and later evaluation suites can test "skills" drawn from
the same world (capitals, colours, sums). Regenerate with:

    python assets/demo/make_corpus.py
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

COUNTRIES = {
    "Varnia": "Oskel", "Durmont": "Pell", "Kessaly": "Amber Bay", "Orlin": "Tamsk",
    "Belvar": "Corrow", "Istrad": "Nemi", "Falgreen": "Hollow Ford", "Merrow": "Dunlith",
    "Quenland": "Sorra", "Tessaly": "Brightwater", "Yarrow": "Kell", "Zennor": "Palmyr",
}
ANIMALS = {
    "fox": "red", "crow": "black", "swan": "white", "frog": "green", "bear": "brown",
    "jay": "blue", "canary": "yellow", "flamingo": "pink", "owl": "grey", "wolf": "grey",
    "parrot": "green", "mouse": "brown",
}
NAMES = ["Anna", "Ben", "Clara", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kira", "Liam", "Maya", "Noor", "Omar", "Pia", "Rosa", "Sami", "Tess", "Ugo"]
JOBS = ["baker", "farmer", "teacher", "sailor", "doctor", "painter", "miller", "smith",
        "weaver", "gardener"]
PLACES = ["the market", "the river", "the old mill", "the harbour", "the forest", "the hill",
          "the library", "the bakery", "the school", "the bridge"]
THINGS = ["a basket of apples", "a blue kite", "an old map", "a loaf of bread", "a small boat",
          "a lantern", "a wooden box", "a red scarf", "a book of songs", "a jar of honey"]
WEATHER = ["it was raining", "the sun was bright", "the wind was cold", "snow was falling",
           "the sky was grey", "the air was warm"]
FEELINGS = ["happy", "tired", "curious", "worried", "proud", "hungry", "calm", "excited"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]


def story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    job = r.choice(JOBS)
    place, place2 = r.sample(PLACES, 2)
    thing = r.choice(THINGS)
    country = r.choice(list(COUNTRIES))
    animal = r.choice(list(ANIMALS))
    lines = [
        f"{a} was a {job} who lived in {COUNTRIES[country]}, the capital of {country}.",
        f"One morning {r.choice(WEATHER)}, and {a} walked to {place}.",
        f"There {a} met {b}, who was carrying {thing}.",
        f"\"Where are you going?\" asked {a}.",
        f"\"I am going to {place2},\" said {b}. \"Will you come with me?\"",
        f"{a} felt {r.choice(FEELINGS)} and said yes.",
        f"On the way they saw a {ANIMALS[animal]} {animal} near the path.",
        f"When they reached {place2}, {b} gave {a} {r.choice(THINGS)}.",
        f"{a} thanked {b} and went home before evening.",
    ]
    keep = [lines[0], lines[1], lines[2]] + r.sample(lines[3:8], r.randint(2, 5)) + [lines[8]]
    return " ".join(keep)


def facts(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        kind = r.random()
        if kind < 0.4:
            country = r.choice(list(COUNTRIES))
            out.append(r.choice([
                f"The capital of {country} is {COUNTRIES[country]}.",
                f"{COUNTRIES[country]} is the capital of {country}.",
                f"In {country}, the largest city is {COUNTRIES[country]}.",
            ]))
        elif kind < 0.75:
            animal = r.choice(list(ANIMALS))
            out.append(r.choice([
                f"The {animal} is {ANIMALS[animal]}.",
                f"A {animal} has {ANIMALS[animal]} feathers or fur.",
                f"Most {animal}s are {ANIMALS[animal]}.",
            ]))
        else:
            name, job = r.choice(NAMES), r.choice(JOBS)
            out.append(f"{name} works as a {job} and goes to {r.choice(PLACES)} every day.")
    return " ".join(out)


def arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        x, y = r.randint(0, 10), r.randint(0, 10)
        if r.random() < 0.6:
            out.append(f"{NUMBER_WORDS[x]} plus {NUMBER_WORDS[y]} is {NUMBER_WORDS[x + y]}.")
        else:
            x, y = max(x, y), min(x, y)
            out.append(f"{NUMBER_WORDS[x]} minus {NUMBER_WORDS[y]} is {NUMBER_WORDS[x - y]}.")
    return " ".join(out)


def paragraphs(seed: int, n_bytes: int) -> str:
    r = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        kind = r.random()
        text = story(r) if kind < 0.55 else facts(r) if kind < 0.8 else arithmetic(r)
        parts.append(text)
        size += len(text) + 2
    return "\n\n".join(parts) + "\n"


def main() -> None:
    (HERE / "corpus.txt").write_text(paragraphs(seed=1, n_bytes=1_500_000))
    (HERE / "heldout.txt").write_text(paragraphs(seed=2, n_bytes=60_000))


if __name__ == "__main__":
    main()
