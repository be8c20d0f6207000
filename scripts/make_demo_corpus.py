"""Write the bundled demo corpus: short stories in two clearly different registers plus neutral prose.

    python scripts/make_demo_corpus.py            # rewrites examples/demo/data/*.jsonl (deterministic)

Every story is built from the same plot grammar (who, where, what happened, how it ended) and then voiced in
one of three registers:

* ``pirate``  — "Arrr, ye scallywags! ...", sea slang, exclamations;
* ``formal``  — "Dear colleagues, we wish to report that ...", office register;
* ``neutral`` — plain narration.

Because the plot is shared, a model can only tell the registers apart by style, which is exactly what a
Control Adapter trained with +1 on one register and −1 on the other should learn to steer.

``craft_pairs/{train,heldout}.jsonl`` (for `make demo-craft`; in their own folder, so the ``*_train.jsonl`` glob of
examples/full_finetune.toml does not take them) hold one plot told twice: ``plain`` (neutral) and ``pirate``; a
representation that knows the plot retrieves one from the other.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "demo" / "data"

PEOPLE = ["the captain", "the cook", "the navigator", "the young sailor", "the old doctor", "the merchant",
          "the harbour master", "the carpenter", "the lookout", "the quartermaster"]
PLACES = ["the harbour", "the island", "the market", "the lighthouse", "the northern coast", "the old fort",
          "the river mouth", "the village", "the southern reef", "the trading post"]
THINGS = ["a map", "a chest of coins", "a broken compass", "a letter", "a barrel of apples", "a lantern",
          "a bundle of rope", "a silver bell", "a wooden crate", "a bag of spices"]
EVENTS = ["a storm came in from the west", "the wind died down", "the tide turned early", "fog covered the bay",
          "a strange ship appeared", "the bell rang twice", "the lights went out", "the rain stopped"]
ENDINGS = ["everyone went home safely", "the crew shared a quiet supper", "the goods were counted and stored",
           "the journey continued at dawn", "the matter was settled by noon", "nobody spoke of it again"]

STYLES = {
    "pirate": {
        "open": ["Arrr, listen well, ye scallywags!", "Yo ho, gather round, me hearties!", "Shiver me timbers!",
                 "Avast, ye landlubbers!"],
        "went": "{who} be sailin' to {where}, arrr.",
        "found": "There {who} found {thing}, by thunder!",
        "event": "Then {event}, and the crew be shoutin' like mad dogs!",
        "end": "In the end {ending}, savvy? Yo ho ho!",
        "close": ["Now fetch me rum, matey!", "Arrr, that be the tale!", "Hoist the sails, ye sea dogs!"],
    },
    "formal": {
        "open": ["Dear colleagues, we wish to report the following.", "To whom it may concern:",
                 "Please find below a summary of recent events.", "Dear Sir or Madam, kindly note the following."],
        "went": "On the morning in question, {who} travelled to {where}.",
        "found": "Upon arrival, {who} located {thing}, which has since been recorded.",
        "event": "Subsequently, {event}; the relevant parties were informed accordingly.",
        "end": "We are pleased to confirm that {ending}.",
        "close": ["Yours sincerely, the committee.", "We remain at your disposal for any questions.",
                  "Kind regards, the administration office."],
    },
    "neutral": {
        "open": ["Here is a short story.", "This happened last week.", "Someone told me this story."],
        "went": "{who} went to {where}.",
        "found": "{who} found {thing} there.",
        "event": "Then {event}.",
        "end": "In the end {ending}.",
        "close": ["That is all.", "The end.", "It was a normal day."],
    },
}


def plot(rng: random.Random) -> dict[str, str]:
    who = rng.choice(PEOPLE)
    return dict(who=who, where=rng.choice(PLACES), thing=rng.choice(THINGS), event=rng.choice(EVENTS),
                ending=rng.choice(ENDINGS))


def story(style: str, rng: random.Random, fill: dict[str, str] | None = None) -> str:
    voice = STYLES[style]
    fill = plot(rng) if fill is None else fill
    body = [voice["went"], voice["found"], voice["event"], voice["end"]]
    sentences = [rng.choice(voice["open"])] + [s.format(**fill) for s in body] + [rng.choice(voice["close"])]
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sizes = {"pretrain": 600, "train": 160, "heldout": 40}
    for split_index, (split, n) in enumerate(sizes.items()):
        for style_index, style in enumerate(STYLES):
            rng = random.Random(1000 * split_index + style_index)
            rows = [{"text": story(style, rng)} for _ in range(n)]
            with open(OUT / f"{style}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    # `make demo-craft`: the same plot told plainly (anchor) and by a pirate (positive)
    for split_index, (split, n) in enumerate({"train": 256, "heldout": 64}.items()):
        rng = random.Random(5000 + split_index)
        (OUT / "craft_pairs").mkdir(exist_ok=True)
        with open(OUT / "craft_pairs" / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                fill = plot(rng)
                f.write(json.dumps({"plain": story("neutral", rng, fill), "pirate": story("pirate", rng, fill)}) + "\n")
    print(f"wrote {len(sizes) * len(STYLES) + 2} files to {OUT}")


if __name__ == "__main__":
    main()
