"""The second held-out math set: word problems that the training generator never produces.

    python -m evaluators.worlds.word_problems > exitagent/data/math/wordproblems.jsonl

``generate()`` builds ``COUNT`` problems from 12 templates of two phrasings each (24 wordings,
taken in turn), with numbers drawn from one fixed seed. Every answer is an exact integer computed
from the drawn numbers; divisions are built from their quotient, so they always come out even.
The templates are all multi-step or differently worded from the training generator's
(``math_tasks._word_problem``): other names, other objects, other questions.
``tests/test_word_problems.py`` shows that no text or number-and-name-blind form of these
problems can come out of the training generator, by enumerating every wording it can produce.

The problems ship as a file (``exitagent/data/math/wordproblems.jsonl``, loaded like a benchmark:
``--source wordproblems``) rather than being generated at load: a result stays comparable with
an earlier one even if this code changes, since such a change shows up as a diff of the data file
(the test pins the file to ``generate()``). ``exitagent.collect`` refuses these tasks
(``refuse_training``): a set that measures generalisation must never be trained on.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterable
from functools import cache

from exitagent.errors import ConfigError
from exitagent.types import Task

SOURCE = "wordproblems"  # the --source name, and the file's stem
COUNT = 300
SEED = "exitagent-wordproblems:v1"
# None of these is a name or an object of the training generator (math_tasks._NAMES, _ITEMS).
NAMES = ("Priya", "Omar", "Lena", "Mateo", "Sofia", "Kwame", "Yuki", "Nadia", "Ravi", "Elena", "Tariq", "Mira")

Problem = tuple[str, int]
Template = Callable[[random.Random, str, str], Problem]


def _bakery(rng: random.Random, name: str, wording: str) -> Problem:
    a, b = rng.randint(3, 9), rng.randint(6, 12)
    c = rng.randint(1, a * b - 1)
    if wording == "a":
        return (f"A bakery makes {a} trays of muffins with {b} muffins on each tray. By closing time {c} muffins "
                "have been sold. How many muffins are still unsold?", a * b - c)
    return (f"{name} bakes {a} batches of {b} cookies and gives {c} of the cookies to the neighbours. "
            f"How many cookies does {name} keep?", a * b - c)


def _daily_plus_extra(rng: random.Random, name: str, wording: str) -> Problem:
    a, b, c = rng.randint(5, 30), rng.randint(3, 9), rng.randint(2, 25)
    if wording == "a":
        return (f"{name} reads {a} pages a day for {b} days and then {c} pages on the final day. "
                f"How many pages does {name} read in total?", a * b + c)
    return (f"Every morning for {b} days, {name} cycles {a} kilometres. On Sunday {name} cycles another {c} "
            "kilometres. What is the total distance, in kilometres?", a * b + c)


def _share_evenly(rng: random.Random, name: str, wording: str) -> Problem:
    a, c, k = rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 6)
    b = c * k  # each pack splits into c equal shares of k: the division comes out even
    if wording == "a":
        return (f"A school buys {a} packs of pencils with {b} pencils in each pack and shares them equally among "
                f"{c} classrooms. How many pencils does each classroom get?", a * k)
    return (f"{name} picks {a} baskets of plums, {b} plums per basket, and packs all of them into bags of {k}. "
            f"How many bags does {name} fill?", a * c)


def _two_prices(rng: random.Random, name: str, wording: str) -> Problem:
    a, b, c, d = rng.randint(8, 25), rng.randint(3, 12), rng.randint(2, 4), rng.randint(2, 5)
    if wording == "a":
        return (f"Adult tickets cost {a} dollars and child tickets cost {b} dollars. A family buys {c} adult "
                f"tickets and {d} child tickets. How much do they spend, in dollars?", a * c + b * d)
    return (f"At a market, melons sell for {a} dollars each and lemons for {b} dollars each. {name} buys {c} "
            f"melons and {d} lemons. What does {name} pay altogether, in dollars?", a * c + b * d)


def _rate_time(rng: random.Random, name: str, wording: str) -> Problem:
    rate, units = rng.randint(3, 15), rng.randint(4, 20)
    if wording == "a":
        return (f"A tank holds {rate * units} litres of water. A hose fills it at {rate} litres per minute. "
                "How many minutes does the hose need to fill the empty tank?", units)
    return (f"{name} saves {rate} dollars every week. How many weeks will it take {name} to save "
            f"{rate * units} dollars?", units)


def _lose_then_gain(rng: random.Random, name: str, wording: str) -> Problem:
    a = rng.randint(20, 60)
    b, c = rng.randint(2, a - 5), rng.randint(2, 30)
    if wording == "a":
        return (f"{name} starts the day with {a} marbles, loses {b} of them at recess and wins {c} back after "
                f"school. How many marbles does {name} end the day with?", a - b + c)
    return (f"A bus leaves the depot with {a} passengers. At the first stop {b} passengers get off and {c} get "
            "on. How many passengers are on the bus now?", a - b + c)


def _rate_product(rng: random.Random, name: str, wording: str) -> Problem:
    a, b = rng.randint(12, 95), rng.randint(2, 9)
    if wording == "a":
        return (f"A train travels at {a} kilometres per hour for {b} hours without stopping. How far does it go, "
                "in kilometres?", a * b)
    return f"A printer prints {a} pages per minute. How many pages can it print in {b} minutes?", a * b


def _ages(rng: random.Random, name: str, wording: str) -> Problem:
    other = NAMES[(NAMES.index(name) + 5) % len(NAMES)]
    a, b, c = rng.randint(4, 15), rng.randint(2, 9), rng.randint(2, 10)
    if wording == "a":
        return (f"{name} is {a} years old, and {other}, an older cousin, is {b} years older than {name}. What "
                f"will the sum of their ages be in {c} years?", a + (a + b) + 2 * c)
    return (f"{name} is {a} years old. {other} is twice as old as {name}. How old will {other} be in {c} "
            "years?", 2 * a + c)


def _rectangle(rng: random.Random, name: str, wording: str) -> Problem:
    a, b = rng.randint(4, 30), rng.randint(3, 20)
    if wording == "a":
        return (f"A rectangular garden is {a} metres long and {b} metres wide. How many metres of fence are "
                "needed to go all the way around it?", 2 * (a + b))
    return f"A rectangular rug measures {a} feet by {b} feet. What is its area, in square feet?", a * b


def _change(rng: random.Random, name: str, wording: str) -> Problem:
    paid = rng.choice((20, 50, 100))
    if wording == "a":
        count = rng.randint(2, 5)
        price = rng.randint(2, (paid - 1) // count)
        return (f"{name} pays with a {paid}-dollar note for {count} notebooks that cost {price} dollars each. "
                f"How much change does {name} get back, in dollars?", paid - count * price)
    shirt = rng.randint(5, paid - 4)
    hat = rng.randint(2, paid - shirt - 1)
    return (f"A shirt costs {shirt} dollars and a hat costs {hat} dollars. {name} pays for one of each with "
            f"{paid} dollars. How many dollars of change are due?", paid - shirt - hat)


def _equal_groups(rng: random.Random, name: str, wording: str) -> Problem:
    groups, size = rng.randint(3, 12), rng.randint(3, 12)
    if wording == "a":
        return (f"There are {groups * size} chairs set out in {groups} equal rows. How many chairs stand in each "
                "row?", size)
    return (f"{groups * size} students are split into teams of {size} for a relay race. How many teams are "
            "there?", groups)


def _week(rng: random.Random, name: str, wording: str) -> Problem:
    a, b = rng.randint(10, 60), rng.randint(10, 90)
    if wording == "a":
        return (f"A cafe sells {a} coffees on each weekday and {b} coffees on each day of the weekend. How many "
                "coffees does it sell in one week?", 5 * a + 2 * b)
    return (f"{name} practises the piano for {a} minutes on each school day and for {b} minutes on Saturday "
            "and again on Sunday. How many minutes of practice is that in a week?", 5 * a + 2 * b)


TEMPLATES: tuple[Template, ...] = (_bakery, _daily_plus_extra, _share_evenly, _two_prices, _rate_time,
                                   _lose_then_gain, _rate_product, _ages, _rectangle, _change, _equal_groups,
                                   _week)
WORDINGS = tuple((template, wording) for template in TEMPLATES for wording in ("a", "b"))


def generate(count: int = COUNT) -> list[dict[str, object]]:
    """``count`` distinct problems as the file's rows, the wordings taken in turn; deterministic."""
    rng = random.Random(SEED)
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    while len(rows) < count:
        template, wording = WORDINGS[len(rows) % len(WORDINGS)]
        problem, answer = template(rng, rng.choice(NAMES), wording)
        if problem in seen:  # redraw: the wordings stay in turn
            continue
        seen.add(problem)
        rows.append({"id": f"word-{len(rows):03d}", "source": "exitagent word problems v1", "problem": problem,
                     "answer": str(answer), "meta": {"template": template.__name__.lstrip("_"), "wording": wording}})
    return rows


def refuse_training(source: str, tasks: Iterable[Task] = ()) -> None:
    """``ConfigError`` if ``source`` names this set or any of ``tasks`` is one of its problems (a copy
    of the file under another name, say): collect calls this, since these tasks are held out."""
    held_out = source == SOURCE or any(
        task.domain == "math" and task.metadata.get("problem") in _problems() for task in tasks)
    if held_out:
        raise ConfigError(f"the word problems ({SOURCE}) are a held-out set and are never trained on: they measure "
                          "whether gains carry over to problems the training generator never produces. Evaluate on "
                          f"them with `python -m exitagent.evaluate --source {SOURCE}`")


@cache
def _problems() -> frozenset[str]:
    return frozenset(str(row["problem"]) for row in generate())


def main() -> int:
    for row in generate():
        print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
