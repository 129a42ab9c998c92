"""Deterministic, seeded generators of the four long-context task families.

``generate(task, size, seed=0)`` returns a :class:`Task` whose ``expected``
answer is exact by construction. Every generator draws from its own
``random.Random`` seeded with the task name, size and seed, so the same
arguments always give the same task and no global random state is touched.

Units of *size*: records for ``salary``, characters for ``niah``, lines for
``aggregate`` and ``pairs``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.tasks.filler import filler_text
from bench.tasks.scoring import is_correct, score

__all__ = [
    "LABELS",
    "TASKS",
    "UNITS",
    "Task",
    "generate",
]

#: The task families, in the order the CLI lists them.
TASKS: tuple[str, ...] = ("salary", "niah", "aggregate", "pairs")

#: What one unit of ``size`` is for each task (singular, plural).
UNITS: dict[str, tuple[str, str]] = {
    "salary": ("record", "records"),
    "niah": ("character", "characters"),
    "aggregate": ("line", "lines"),
    "pairs": ("line", "lines"),
}


@dataclass(frozen=True)
class Task:
    """One generated task: the context, the question about it and the exact answer.

    ``expected`` is a string for ``salary``, ``niah`` and ``aggregate`` and a
    sorted list of ``(lower_id, higher_id)`` pairs for ``pairs``.
    """

    context: str
    question: str
    expected: str | list[Any]
    name: str = ""
    size: int = 0
    seed: int = 0
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def score(self, answer: str | None) -> float:
        """1.0/0.0 for exact-answer tasks, the F1 over pairs for ``pairs``."""
        return score(self.name, answer, self.expected)

    def is_correct(self, answer: str | None) -> bool:
        return is_correct(self.name, answer, self.expected)


def _rng(task: str, size: int, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs
    # and processes (unaffected by PYTHONHASHSEED).
    return random.Random(f"bench.tasks:{task}:{size}:{seed}")


# ----------------------------------------------------------------- salary
_FIRST = (
    "Alice",
    "Bob",
    "Charlie",
    "Diana",
    "Ethan",
    "Fatima",
    "George",
    "Hannah",
    "Ivan",
    "Julia",
    "Kenji",
    "Laura",
    "Miguel",
    "Nadia",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Samuel",
    "Tara",
    "Umar",
    "Vera",
    "William",
    "Xenia",
    "Yusuf",
    "Zoe",
    "Amara",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Elena",
    "Felix",
    "Grace",
    "Hugo",
    "Ingrid",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
    "Rita",
    "Stefan",
    "Tomas",
    "Ursula",
    "Victor",
    "Wendy",
    "Yara",
    "Zane",
)
_LAST = (
    "Smith",
    "Johnson",
    "Garcia",
    "Nakamura",
    "Okafor",
    "Schmidt",
    "Rossi",
    "Kowalski",
    "Dubois",
    "Silva",
    "Andersen",
    "Novak",
    "Haddad",
    "Petrov",
    "Lindqvist",
    "O'Brien",
    "Moreau",
    "Tanaka",
    "Fischer",
    "Costa",
    "Brennan",
    "Horvat",
    "Ivanova",
    "Jensen",
    "Kaur",
    "Larsen",
    "Mendes",
    "Nguyen",
    "Ortiz",
    "Park",
    "Quinn",
    "Reyes",
    "Sato",
    "Thompson",
    "Urban",
    "Vargas",
    "Weber",
    "Yilmaz",
    "Zhang",
    "Abbott",
    "Becker",
    "Chen",
    "Davies",
    "Evans",
    "Ferreira",
    "Gallagher",
    "Hughes",
    "Ibrahim",
    "Keller",
    "Lopez",
)
_OTHER_DEPTS = ("Marketing", "Sales", "HR", "Finance", "Operations", "Legal", "Customer Support", "Design")
# Departments whose name contains "Engineering" but which are not Engineering.
_LOOKALIKES = (
    ("Engineering Recruiting", "HR"),
    ("Sales Engineering", "Sales"),
    ("Facilities Engineering", "Operations"),
    ("Engineering Finance", "Finance"),
)
_CITIES = (
    "Austin",
    "Berlin",
    "Chicago",
    "Dublin",
    "Lisbon",
    "Madrid",
    "Melbourne",
    "Montreal",
    "Nairobi",
    "Osaka",
    "Prague",
    "Seattle",
    "Singapore",
    "Toronto",
    "Warsaw",
    "Zurich",
)
_PROJECTS = (
    "the billing migration",
    "the new onboarding flow",
    "the annual audit",
    "the partner portal",
    "the spring product launch",
    "the data-retention review",
    "the mobile redesign",
    "the office move",
)
_HEADER = (
    "Employee Records (each line: name, department, current annual salary; "
    "bonuses and past salaries are noted separately)"
)


_INITIALS = "ABCDEFGHJKLMNPRSTVW"


def _unique_names(rng: random.Random, n: int) -> list[str]:
    """*n* distinct full names: plain "First Last" first, then with one or two middle initials."""
    levels = (
        (len(_FIRST) * len(_LAST), 0),
        (len(_FIRST) * len(_INITIALS) * len(_LAST), 1),
        (len(_FIRST) * len(_INITIALS) ** 2 * len(_LAST), 2),
    )
    if n > sum(cap for cap, _ in levels):
        raise ValueError(f"salary supports at most {sum(cap for cap, _ in levels):,} records, got {n:,}")
    names: list[str] = []
    for capacity, initials in levels:
        want = min(n - len(names), capacity)
        if want <= 0:
            break
        for index in rng.sample(range(capacity), want):
            index, last = divmod(index, len(_LAST))
            middle = []
            for _ in range(initials):
                index, k = divmod(index, len(_INITIALS))
                middle.append(f"{_INITIALS[k]}.")
            names.append(" ".join([_FIRST[index], *middle, _LAST[last]]))
    if len(names) > len(_FIRST) * len(_LAST):
        rng.shuffle(names)
    return names


def _salary_record(rng: random.Random, name: str, dept: str, parent: str | None, salary: int) -> str:
    head = f"- {name}: {dept}, ${salary:,}."
    year = rng.randint(2008, 2021)
    first = name.split()[0]
    optional = [
        f"Based in the {rng.choice(_CITIES)} office since {year}.",
        f"Earned ${rng.randrange(salary // 2000, salary // 1000) * 1000:,} before the {rng.randint(year + 1, 2023)} pay review.",
        f"Received a ${rng.randrange(2000, 20001, 500):,} performance bonus in {rng.randint(2020, 2024)}.",
        f"Reports to {rng.choice(_FIRST)} {rng.choice(_LAST)}.",
        f"{first} is currently leading work on {rng.choice(_PROJECTS)}.",
        f"Holds badge {rng.choice('ABCDEFGHK')}{rng.randint(1000, 9999)} and a parking permit.",
        f"Past salary: ${rng.randrange(salary // 2000, salary // 1000) * 1000:,} in {rng.randint(2012, 2020)}.",
        f"Signing bonus on joining was ${rng.randrange(1000, 15001, 1000):,}.",
    ]
    if dept == "Engineering":
        optional.append(f"Transferred from {rng.choice(_OTHER_DEPTS)} in {rng.randint(2015, 2023)}.")
    else:
        optional.append(f"Transferred from Engineering in {rng.randint(2015, 2023)}.")
        optional.append(f"Works closely with the Engineering team on {rng.choice(_PROJECTS)}.")
    rng.shuffle(optional)
    sentences = [f"The {dept} team is part of {parent}, not Engineering."] if parent else []
    text = head
    for sentence in sentences + optional:
        if len(text) >= 224 or len(text) + 1 + len(sentence) > 268:
            continue
        text += " " + sentence
    return text


def _gen_salary(rng: random.Random, size: int) -> tuple[str, str, str, dict[str, Any]]:
    names = _unique_names(rng, size)
    eng_slot = rng.randrange(size)  # at least one Engineering employee in every task
    records: list[str] = []
    total = 0
    count = 0
    for i, name in enumerate(names):
        roll = rng.random()
        parent: str | None = None
        if i == eng_slot or roll < 0.30:
            dept = "Engineering"
        elif roll < 0.42:
            dept, parent = rng.choice(_LOOKALIKES)
        else:
            dept = rng.choice(_OTHER_DEPTS)
        salary = rng.randrange(45_000, 180_001, 1000)
        if dept == "Engineering":
            total += salary
            count += 1
        records.append(_salary_record(rng, name, dept, parent, salary))
    context = _HEADER + ":\n" + "\n".join(records)
    question = "What is the total salary of all Engineering employees?"
    return context, question, f"${total:,}", {"engineering_employees": count}


# ------------------------------------------------------------------- niah
_NEEDLE_KEYS = (
    "Valparaiso",
    "the amber observatory",
    "Reykjavik",
    "the silver heron",
    "Tbilisi",
    "the quartz garden",
    "Windhoek",
    "the violet archive",
    "Ljubljana",
    "the cobalt lantern",
    "Ulaanbaatar",
    "the saffron bridge",
)


def _gen_niah(rng: random.Random, size: int, depth: float) -> tuple[str, str, str, dict[str, Any]]:
    key = rng.choice(_NEEDLE_KEYS)
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = f"The special magic number for {key} is {number}."
    if size < len(needle) + 1:
        raise ValueError(f"niah needs size >= {len(needle) + 1} characters, got {size}")
    budget = size - len(needle) - 1
    filler = filler_text(rng, budget)
    # Sentence starts are the places a needle can go without splitting a sentence.
    starts = [0] + [i + 1 for i, ch in enumerate(filler) if ch in " \n" and i > 0 and filler[i - 1] == "."]
    starts = [s for s in starts if s < budget] or [0]
    target = depth * budget
    offset = min(starts, key=lambda s: (abs(s - target), s))
    context = filler[:offset] + needle + " " + filler[offset:]
    question = (
        f"What is the special magic number for {key} mentioned in the text? Answer with the number only."
    )
    return context, question, number, {"needle": needle, "offset": offset}


# ------------------------------------------------------- aggregate, pairs
#: The labels of the OOLONG-style tasks; each line's label is implied by its text.
LABELS: tuple[str, ...] = ("location", "numeric value", "human being", "description", "abbreviation")

_LANDMARKS = (
    "the Eiffel Tower",
    "the Golden Gate Bridge",
    "the Sydney Opera House",
    "the Colosseum",
    "Machu Picchu",
    "the Taj Mahal",
    "the Acropolis",
    "Angkor Wat",
    "the Alhambra",
    "Petra",
)
_PLACES = ("Kyoto", "Marrakesh", "Lima", "Oslo", "Cairo", "Porto", "Krakow", "Hanoi", "Quito", "Tallinn")
_ANIMALS = ("penguins", "salmon", "bats", "owls", "whales", "ants", "bees", "geese", "turtles", "wolves")
_COUNTABLE = (
    ("eggs", "dozen"),
    ("days", "leap year"),
    ("cards", "standard deck"),
    ("players", "rugby team"),
    ("keys", "piano"),
    ("strings", "violin"),
    ("legs", "spider"),
    ("sides", "hexagon"),
)
_TITLES = ("War and Peace", "Moby-Dick", "Don Quixote", "Pride and Prejudice", "Frankenstein", "Dracula")
_DISCOVERIES = ("penicillin", "radium", "the electron", "X-rays", "insulin", "oxygen", "the neutron")
_FEATS = (
    "reach the South Pole",
    "climb Everest",
    "fly solo across the Atlantic",
    "walk on the Moon",
    "swim the English Channel",
    "sail around the world alone",
)
_BEHAVIOURS = (
    "migrate south",
    "hibernate",
    "sleep upside down",
    "travel in groups",
    "build nests",
    "return to the same place",
)
_WORDS = (
    "serendipity",
    "ephemeral",
    "ubiquitous",
    "melancholy",
    "petrichor",
    "sonder",
    "hiraeth",
    "apricity",
)
_MACHINES = ("barometer", "compass", "steam engine", "thermostat", "sundial", "telescope", "metronome")
_ACRONYMS = ("NASA", "UNESCO", "RADAR", "LASER", "SCUBA", "HTML", "NATO", "CAPTCHA", "GIF", "PIN")
_PHRASES = (
    "United Nations",
    "as soon as possible",
    "Doctor of Philosophy",
    "World Health Organization",
    "for your information",
    "Very Important Person",
    "frequently asked questions",
)

_TEMPLATES: dict[str, tuple[Callable[[random.Random], str], ...]] = {
    "location": (
        lambda r: f"Where is {r.choice(_LANDMARKS)} located?",
        lambda r: f"Which country is {r.choice(_PLACES)} in?",
        lambda r: f"In which city can you visit {r.choice(_LANDMARKS)}?",
        lambda r: f"Where do {r.choice(_ANIMALS)} spend the winter?",
    ),
    "numeric value": (
        lambda r: "How many {} are there in a {}?".format(*r.choice(_COUNTABLE)),
        lambda r: f"In what year was {r.choice(_LANDMARKS)} completed?",
        lambda r: f"How tall is {r.choice(_LANDMARKS)}?",
        lambda r: f"How long do {r.choice(_ANIMALS)} usually live?",
    ),
    "human being": (
        lambda r: f"Who designed {r.choice(_LANDMARKS)}?",
        lambda r: f"Who wrote the novel {r.choice(_TITLES)}?",
        lambda r: f"Which scientist discovered {r.choice(_DISCOVERIES)}?",
        lambda r: f"Who was the first person to {r.choice(_FEATS)}?",
    ),
    "description": (
        lambda r: f"Why do {r.choice(_ANIMALS)} {r.choice(_BEHAVIOURS)}?",
        lambda r: f"What does the word {r.choice(_WORDS)} mean?",
        lambda r: f"How does a {r.choice(_MACHINES)} work?",
        lambda r: f"What is the purpose of a {r.choice(_MACHINES)}?",
    ),
    "abbreviation": (
        lambda r: f"What does {r.choice(_ACRONYMS)} stand for?",
        lambda r: f"What is the abbreviation for {r.choice(_PHRASES)}?",
        lambda r: f"What is the acronym of {r.choice(_PHRASES)}?",
    ),
}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _instance(rng: random.Random, label: str) -> str:
    return rng.choice(_TEMPLATES[label])(rng)


def _line(rng: random.Random, user: int, label: str) -> str:
    date = f"{rng.choice(_MONTHS)} {rng.randint(1, 28):02d}, {rng.randint(2021, 2024)}"
    return f"Date: {date} || User: {user} || Instance: {_instance(rng, label)}"


def _labels_sentence() -> str:
    return (
        "Each line of the context is a question asked by a user. Its label is not written: infer it "
        "from the question text. The possible labels are: " + ", ".join(f"'{x}'" for x in LABELS) + "."
    )


def _gen_aggregate(rng: random.Random, size: int) -> tuple[str, str, str, dict[str, Any]]:
    users = rng.sample(range(10_000, 100_000), max(1, size // 4))
    target = rng.choice(LABELS)
    labels = [rng.choice(LABELS) for _ in range(size)]
    lines = [_line(rng, rng.choice(users), label) for label in labels]
    count = labels.count(target)
    question = f"{_labels_sentence()} How many lines have the label '{target}'? Answer with the number only."
    return "\n".join(lines), question, str(count), {"label": target, "labels": labels}


def _gen_pairs(rng: random.Random, size: int) -> tuple[str, str, list[tuple[int, int]], dict[str, Any]]:
    if size < 4:
        raise ValueError(f"pairs needs size >= 4 lines, got {size}")
    n_users = max(3, size // 5)
    users = rng.sample(range(10_000, 100_000), n_users)
    n_qual = max(2, min(8, n_users // 4 + 1))
    x, y = rng.sample(LABELS, 2)
    both = size >= 3 * n_qual and rng.random() < 0.5  # "X and Y" variant needs room for two lines each
    required = (x, y) if both else (x,)
    qualifying = set(rng.sample(users, n_qual))
    # What each non-qualifying user must never get: X (or, in the X-and-Y variant, one of the two).
    banned = {u: (rng.choice(required) if both else x) for u in users if u not in qualifying}
    rows: list[tuple[int, str]] = [(u, label) for u in sorted(qualifying) for label in required]
    while len(rows) < size:
        u = rng.choice(users)
        allowed = [label for label in LABELS if label != banned.get(u)]
        rows.append((u, rng.choice(allowed)))
    rng.shuffle(rows)
    lines = [_line(rng, u, label) for u, label in rows]
    has: dict[int, set[str]] = {}
    for u, label in rows:
        has.setdefault(u, set()).add(label)
    ok = sorted(u for u, labels in has.items() if all(r in labels for r in required))
    expected = [(a, b) for a, b in itertools.combinations(ok, 2)]
    cond = f"at least one line with the label '{x}'"
    if both:
        cond += f" and at least one line with the label '{y}'"
    question = (
        f"{_labels_sentence()} List every pair of user IDs where both users have {cond}. "
        "List each pair once, lower ID first, one pair per line, formatted as (ID1, ID2), and nothing else."
    )
    return "\n".join(lines), question, expected, {"labels": required, "users": ok}


def generate(task: str, size: int, seed: int = 0, *, depth: float = 0.5) -> Task:
    """The task *task* of size *size* for *seed*; the same arguments always give the same task.

    *depth* (0.0 = start, 1.0 = end) only matters for ``niah``: where the fact sits.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0.0 and 1.0, got {depth}")
    rng = _rng(task, size, seed)
    expected: str | list[Any]
    if task == "salary":
        context, question, expected, meta = _gen_salary(rng, size)
    elif task == "niah":
        context, question, expected, meta = _gen_niah(rng, size, depth)
    elif task == "aggregate":
        context, question, expected, meta = _gen_aggregate(rng, size)
    else:
        context, question, expected, meta = _gen_pairs(rng, size)
    return Task(
        context=context,
        question=question,
        expected=expected,
        name=task,
        size=size,
        seed=seed,
        depth=depth if task == "niah" else None,
        meta=meta,
    )
