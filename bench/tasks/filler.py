"""Locally generated filler prose for the haystack tasks (no downloads, no digits).

Sentences are assembled from small word lists with a seeded ``random.Random``,
so the same seed always gives the same text. The vocabulary holds no numbers
and none of the needle keys of :mod:`bench.tasks.generators`, so the only
"magic number" in a haystack is the needle itself.
"""

from __future__ import annotations

import random

__all__ = ["filler_sentence", "filler_text"]

_SUBJECTS = (
    "The old gardener",
    "A patient teacher",
    "The river",
    "Every traveller",
    "The small library",
    "A quiet neighbour",
    "The village baker",
    "Our committee",
    "The morning train",
    "A curious student",
    "The lighthouse keeper",
    "The northern wind",
    "A tired carpenter",
    "The school choir",
    "The harbour",
    "An early reader",
    "The market square",
    "A careful editor",
    "The mountain path",
    "Her younger brother",
)
_VERBS = (
    "remembered",
    "described",
    "carried",
    "ignored",
    "praised",
    "repaired",
    "followed",
    "painted",
    "questioned",
    "explained",
    "gathered",
    "measured",
    "borrowed",
    "watched",
    "planned",
    "copied",
)
_OBJECTS = (
    "the long letter",
    "a bundle of dry leaves",
    "the forgotten recipe",
    "an unfinished map",
    "the crooked fence",
    "a basket of pears",
    "the evening lecture",
    "the broken clock",
    "a story about the sea",
    "the shape of the clouds",
    "a song from the valley",
    "the visitors' book",
    "the narrow bridge",
    "a lantern with green glass",
    "the winter accounts",
    "an argument about tea",
)
_TAILS = (
    "before the rain began",
    "while the kettle was singing",
    "without saying a word",
    "for the third time",
    "as the bells rang over the town",
    "after a very long lunch",
    "with unusual care",
    "because nobody else would",
    "in the light of the late afternoon",
    "just as the shops were closing",
    "although it made little sense",
    "on the way back from the fair",
    "under the old oak tree",
    "with a great deal of patience",
    "long after everyone had left",
    "in a notebook with a red cover",
)
_ASIDES = (
    "Nobody could say why it mattered so much.",
    "It was, by all accounts, an ordinary week.",
    "Some people still talk about it.",
    "The details have been argued over ever since.",
    "That was how things were done back then.",
    "It seemed important at the time.",
    "The rest of the day passed quietly.",
    "Most of the town agreed it was sensible.",
)


def filler_sentence(rng: random.Random) -> str:
    """One plausible sentence of prose, ending with a full stop."""
    if rng.random() < 0.12:
        return rng.choice(_ASIDES)
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def filler_text(rng: random.Random, chars: int) -> str:
    """Exactly *chars* characters of prose: whole sentences joined by spaces, the last one cut."""
    if chars <= 0:
        return ""
    parts: list[str] = []
    total = 0
    while total < chars:
        sentence = filler_sentence(rng)
        # A paragraph break now and then makes the haystack read like a document.
        sep = "\n\n" if parts and rng.random() < 0.08 else " "
        if parts:
            parts.append(sep)
            total += len(sep)
        parts.append(sentence)
        total += len(sentence)
    return "".join(parts)[:chars]
