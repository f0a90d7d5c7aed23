"""A seeded generator of GSM8K-style word problems, for machines that have no dataset.

Each problem takes two to four arithmetic steps on small integers. Worked answers follow
GSM8K's format exactly: one line per step with a calculator annotation `<<a*b=c>>`, then a
final line `#### N`. Every intermediate value is a non-negative integer: divisions are exact
by construction, subtractions never go below zero.
"""

import random

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina",
         "Marco", "Priya", "Omar", "Lena", "Diego", "Mei", "Sam", "Aisha", "Tom"]
PRONOUNS = {"Natalia": "she", "Weng": "she", "Betty": "she", "Julie": "she", "James": "he",
            "Albert": "he", "Ken": "he", "Alexis": "she", "Tina": "she", "Marco": "he",
            "Priya": "she", "Omar": "he", "Lena": "she", "Diego": "he", "Mei": "she",
            "Sam": "he", "Aisha": "she", "Tom": "he"}
THINGS = ["stickers", "marbles", "stamps", "pencils", "cards", "shells", "beads", "coins"]
GOODS = [("notebook", "notebooks"), ("apple", "apples"), ("ticket", "tickets"),
         ("sandwich", "sandwiches"), ("toy car", "toy cars"), ("book", "books")]
BAKES = [("cookies", "trays"), ("muffins", "pans"), ("cupcakes", "boxes"), ("rolls", "baskets")]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a // b}


class _Work:
    """A worked answer, built one step at a time; the last step's value is the answer."""

    def __init__(self):
        self.lines, self.value = [], None

    def step(self, a, op, b, lead, tail, money=False):
        """Add the line `lead a*b = <<a*b=c>>c tail` (`= $<<...` for money); return c."""
        if op == "/" and a % b:
            raise ValueError(f"inexact division {a}/{b}")
        self.value = OPS[op](a, b)
        if self.value < 0:
            raise ValueError(f"negative value {a}{op}{b}")
        dollar = "$" if money else ""
        self.lines.append(f"{lead} {a}{op}{b} = {dollar}<<{a}{op}{b}={self.value}>>{self.value}{tail}")
        return self.value


def _person(rng):
    name = rng.choice(NAMES)
    return name, PRONOUNS[name]


def _change(rng, work):
    name, he = _person(rng)
    one, many = rng.choice(GOODS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    bill = next(b for b in (20, 50, 100, 200) if b >= count * price)
    cost = work.step(count, "*", price, f"The {many} cost", ".", money=True)
    work.step(bill, "-", cost, f"{name} gets back", " in change.", money=True)
    return (f"{name} buys {count} {many} for ${price} per {one} and pays with a ${bill} "
            f"bill. How much change does {he} get, in dollars?")


def _collection(rng, work):
    name, he = _person(rng)
    things = rng.choice(THINGS)
    start, packs, per_pack = rng.randint(5, 60), rng.randint(2, 8), rng.randint(3, 12)
    bought = work.step(packs, "*", per_pack, f"{name} buys", f" {things}.")
    total = work.step(start, "+", bought, "Then", f" {things} in all.")
    given = rng.randint(1, total - 1)
    friend = rng.choice([n for n in NAMES if n != name])
    work.step(total, "-", given, f"After giving some to {friend}, {he} has", f" {things}.")
    return (f"{name} has {start} {things}. {he.capitalize()} buys {packs} packs with "
            f"{per_pack} {things} in each pack, then gives {given} {things} to {friend}. "
            f"How many {things} does {name} have now?")


def _reading(rng, work):
    name, he = _person(rng)
    fast, fast_days = rng.randint(10, 40), rng.randint(2, 6)
    slow, slow_days = rng.randint(5, 20), rng.randint(2, 6)
    first = work.step(fast, "*", fast_days, "In the first days", " pages are read.")
    second = work.step(slow, "*", slow_days, "In the next days", " pages are read.")
    read = work.step(first, "+", second, "Altogether", " pages are read.")
    book = read + rng.randint(10, 200)
    work.step(book, "-", read, "So", " pages are left.")
    return (f"{name} reads {fast} pages a day for {fast_days} days, then {slow} pages a day "
            f"for the next {slow_days} days. The book has {book} pages. How many pages "
            f"does {he} still have to read?")


def _savings(rng, work):
    name, he = _person(rng)
    wage, hours, days = 2 * rng.randint(4, 15), rng.randint(2, 8), rng.randint(2, 6)
    daily = work.step(wage, "*", hours, f"Each day {name} earns", ".", money=True)
    earned = work.step(daily, "*", days, "Over all the days that is", ".", money=True)
    work.step(earned, "/", 2, f"{he.capitalize()} saves", ".", money=True)
    return (f"{name} earns ${wage} an hour and works {hours} hours a day for {days} days. "
            f"{he.capitalize()} saves half of the money. How many dollars does {he} save?")


def _sharing(rng, work):
    name, he = _person(rng)
    food, holders = rng.choice(BAKES)
    count, per = rng.randint(2, 6), rng.randint(6, 24)
    friends = rng.randint(2, 6)
    baked = work.step(count, "*", per, f"{name} bakes", f" {food}.")
    # Eat the remainder modulo `friends` plus a few whole rounds, so the rest divides exactly.
    eaten = baked % friends + friends * rng.randint(0, 2)
    if eaten == 0:
        eaten = friends
    rest = work.step(baked, "-", eaten, "After eating some there are", f" {food} left.")
    work.step(rest, "/", friends, "Each friend gets", f" {food}.")
    return (f"{name} bakes {count} {holders} of {per} {food}. {he.capitalize()} eats "
            f"{eaten} of them and shares the rest equally among {friends} friends. How "
            f"many {food} does each friend get?")


def _farm(rng, work):
    chickens, cows, sold = rng.randint(3, 40), rng.randint(2, 20), rng.randint(1, 5)
    left = work.step(cows, "-", min(sold, cows - 1), "The farm keeps", " cows.")
    cow_legs = work.step(left, "*", 4, "The cows have", " legs.")
    hen_legs = work.step(chickens, "*", 2, "The chickens have", " legs.")
    work.step(cow_legs, "+", hen_legs, "Together they have", " legs.")
    return (f"A farm has {chickens} chickens and {cows} cows. The farmer sells "
            f"{min(sold, cows - 1)} of the cows. How many legs do the remaining animals "
            f"have in total?")


def _trip(rng, work):
    speed, hours = rng.randint(30, 80), rng.randint(2, 5)
    speed2, hours2 = rng.randint(20, 70), rng.randint(2, 4)
    first = work.step(speed, "*", hours, "First the train travels", " miles.")
    second = work.step(speed2, "*", hours2, "Then it travels", " miles.")
    work.step(first, "+", second, "In total it travels", " miles.")
    return (f"A train travels at {speed} miles per hour for {hours} hours, then at {speed2} "
            f"miles per hour for {hours2} hours. How many miles does it travel in total?")


def _seats(rng, work):
    rows, per_row = rng.randint(4, 15), rng.randint(5, 20)
    seats = work.step(rows, "*", per_row, "The hall has", " seats.")
    taken = rng.randint(1, seats // 2)
    arriving = rng.randint(1, seats - taken)
    occupied = work.step(taken, "+", arriving, "Then", " seats are taken.")
    work.step(seats, "-", occupied, "So", " seats are empty.")
    return (f"A hall has {rows} rows with {per_row} seats in each row. {taken} seats are "
            f"taken, and {arriving} more people come in and sit down. How many seats are "
            f"still empty?")


# Each template draws its numbers, works the steps into `work` and returns the question.
TEMPLATES = (_change, _collection, _reading, _savings, _sharing, _farm, _trip, _seats)


def generate(n, seed, split, exclude=()):
    """`n` problems as dicts {question, answer}, reproducible from (seed, split). Questions in
    `exclude` (e.g. the train split's, when generating test) are never produced."""
    rng = random.Random(f"kava-synthetic-{seed}-{split}")
    seen = set(exclude)
    rows = []
    while len(rows) < n:
        work = _Work()
        question = rng.choice(TEMPLATES)(rng, work)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": "\n".join([*work.lines, f"#### {work.value}"])})
    return rows
