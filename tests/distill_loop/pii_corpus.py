# ruff: noqa: E501  - the generators below read best one per line
"""A seeded, labelled corpus of customer-service prompts holding personal identifiers, and
look-alikes that hold none (order numbers, prices, dates, versions, tracking codes...).

Every identifier is fake but valid by the rule the redactor checks: test card numbers and
Luhn-completed ones, IBANs with computed check digits, 555 and drama-range phone numbers that
phonenumbers accepts, example.com addresses. Built here, so the test owns its ground truth.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn


@dataclass(frozen=True)
class Prompt:
    text: str
    labels: tuple[tuple[str, str], ...]  # (kind, the raw identifier as written in text)


TEST_CARDS = [
    "4242424242424242", "4111111111111111", "4000056655665556", "5555555555554444", "5105105105105100",
    "2223003122003222", "6011111111111117", "6011000990139424", "3056930009020004", "3566002020360505",
]  # fmt: skip
AMEX = ["378282246310005", "371449635398431", "378734493671000"]
FIRST = ["john", "maria", "li", "ahmed", "sofia", "pierre", "anna", "raj", "chloe", "tom"]
LAST = ["doe", "garcia", "wang", "khan", "rossi", "martin", "muller", "patel", "dubois", "smith"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "support.example.co.uk", "example.de"]
STREET_NAMES = ["Baker", "High", "Church", "Station", "Maple", "Oak", "Elm", "Park", "Victoria", "Mill"]
UK_STREET = ["Street", "Road", "Lane", "Avenue", "Close", "Gardens", "Way", "Terrace"]
US_STREET = ["St", "Ave", "Blvd", "Street", "Avenue", "Drive", "Road", "Parkway"]
UK_TOWNS = ["London", "Leeds", "Bristol", "Manchester", "York", "Cardiff"]
US_TOWNS = [("Springfield", "IL"), ("Austin", "TX"), ("Portland", "OR"), ("Denver", "CO"), ("Boston", "MA")]
IBAN_BBAN = {  # country: BBAN shape (A letter, N digit)
    "GB": "AAAANNNNNNNNNNNNNN",
    "DE": "NNNNNNNNNNNNNNNNNN",
    "NL": "AAAANNNNNNNNNN",
    "IE": "AAAANNNNNNNNNNNNNN",
    "AT": "NNNNNNNNNNNNNNNN",
    "CH": "NNNNNNNNNNNNNNNNNNN",
}

# Sentences an identifier sits in; {x} is the identifier, {o} an order number beside it.
TEMPLATES = {
    "EMAIL": [
        "Hi, my email is {x}, please update my account.",
        "Send the receipt for order {o} to {x} thanks",
        "I never got the confirmation at {x}.",
        "Contact: {x}\nOrder: {o}",
        "can you change my login from {x} to something else? HARD",
    ],
    "PHONE": [
        "You can reach me on {x} after 5pm.",
        "My phone number is {x}, order {o}.",
        "Call me back at {x} about the refund",
        "phone: {x}",
        "The courier should ring {x} when they arrive (order {o}).",
    ],
    "CARD": [
        "Please charge card {x} for order {o}.",
        "My card number is {x} and it was declined.",
        "refund to {x} please",
        "card: {x} exp 09/27",
    ],
    "IBAN": [
        "Please send the refund to IBAN {x}.",
        "My bank account is {x}, order {o}.",
        "iban: {x}",
        "Wire it to {x} please, the reference is {o}.",
    ],
    "SSN": [
        "My SSN is {x} for the credit check.",
        "social security number {x}, order {o}",
        "For tax purposes: {x}.",
    ],
    "NINO": [
        "My National Insurance number is {x}.",
        "NI number: {x} (order {o})",
        "payroll needs {x} updated",
    ],
    "POSTCODE": [
        "Please ship to {x}.",
        "My address is {x}, order {o}.",
        "Deliver to:\n{x}",
        "I moved to {x} last week.",
    ],
}


def order_number(rng: random.Random) -> str:
    return rng.choice(["#", "A", "ORD-", "", "no. "]) + str(rng.randint(10_000, 99_999_999))


def email(rng: random.Random) -> str:
    f, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice(
        [
            f"{f}.{last}",
            f"{f}+orders",
            f"{f}_{last}{rng.randint(1, 99)}",
            f"{f[0]}{last}",
            f"{f}.{last}+tag-{rng.randint(1, 9)}",
        ]
    )
    out = f"{local}@{rng.choice(DOMAINS)}"
    return out.upper() if rng.random() < 0.1 else out


def phone(rng: random.Random) -> str:
    while True:
        kind = rng.randrange(4)
        if kind == 0:  # US, 555 exchange
            a, line = rng.choice(["415", "212", "646", "312", "617", "206", "303", "512"]), rng.randint(1000, 9999)
            raw = rng.choice(
                [f"({a}) 555-{line}", f"{a}-555-{line}", f"{a}.555.{line}", f"+1 {a} 555 {line}", f"+1-{a}-555-{line}",
                 f"{a}555{line}", f"1 ({a}) 555-{line}"]
            )  # fmt: skip
            region = "US"
        elif kind == 1:  # GB: London drama range, mobiles
            n = rng.randint(0, 999)
            mob = f"{rng.randint(100, 999)} {rng.randint(100000, 999999)}"
            raw = rng.choice([f"020 7946 {n:04d}", f"+44 20 7946 {n:04d}", f"+44 (0)20 7946 {n:04d}", f"07{mob}",
                              f"+44 7{mob}"])  # fmt: skip
            region = "GB"
        elif kind == 2:  # DE: Berlin, Munich, mobiles
            raw = rng.choice(
                [f"030 {rng.randint(1000000, 99999999)}", f"+49 30 {rng.randint(1000000, 99999999)}",
                 f"089 {rng.randint(1000000, 9999999)}", f"0151 {rng.randint(10000000, 99999999)}",
                 f"+49 151 {rng.randint(10000000, 99999999)}", f"0049 30 {rng.randint(1000000, 99999999)}"]
            )  # fmt: skip
            region = "DE"
        else:  # FR: Paris, mobiles, in pairs
            pairs = " ".join(f"{rng.randint(0, 99):02d}" for _ in range(4))
            lead = rng.choice(["1", "6", "7"])
            raw = rng.choice([f"0{lead} {pairs}", f"+33 {lead} {pairs}", f"0{lead}.{pairs.replace(' ', '.')}"])
            region = "FR"
        if phonenumbers.is_valid_number(phonenumbers.parse(raw, region)):
            return raw


def card(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:
        digits = rng.choice(AMEX)
        return rng.choice(
            [digits, f"{digits[:4]} {digits[4:10]} {digits[10:]}", f"{digits[:4]}-{digits[4:10]}-{digits[10:]}"]
        )
    if roll < 0.5:
        digits = rng.choice(TEST_CARDS)
    else:
        body = rng.choice("45") + "".join(rng.choice(string.digits) for _ in range(14))
        digits = body + luhn.calc_check_digit(body)
    sep = rng.choice(["", " ", "-"])
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def iban_number(rng: random.Random) -> str:
    while True:  # some countries' BBANs carry a national check digit too: draw until valid
        cc = rng.choice(list(IBAN_BBAN))
        bban = "".join(rng.choice(string.ascii_uppercase if c == "A" else string.digits) for c in IBAN_BBAN[cc])
        check = 98 - int("".join(str(int(c, 36)) for c in bban + cc + "00")) % 97
        compact = f"{cc}{check:02d}{bban}"
        if iban.is_valid(compact):
            break
    return compact if rng.random() < 0.4 else " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    raw = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
    return rng.choice([f"{raw[:3]}-{raw[3:5]}-{raw[5:]}", f"{raw[:3]} {raw[3:5]} {raw[5:]}"])


def nino(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return "QQ 12 34 56 C"
    first = rng.choice([c for c in string.ascii_uppercase if c not in "DFIQUV"])
    second = rng.choice([c for c in string.ascii_uppercase if c not in "DFIOQUV"])
    if first + second in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}:
        first, second = "A", "B"
    digits = f"{rng.randint(0, 999999):06d}"
    suffix = rng.choice("ABCD")
    if rng.random() < 0.5:
        return f"{first}{second}{digits}{suffix}"
    return f"{first}{second} {digits[:2]} {digits[2:4]} {digits[4:]} {suffix}"


def address(rng: random.Random) -> tuple[str, str]:
    """(address, postcode): UK, US, German or French."""
    roll = rng.random()
    name = rng.choice(STREET_NAMES)
    if roll < 0.4:
        letters = string.ascii_uppercase
        outward = rng.choice(letters) + rng.choice(["", rng.choice(letters.replace("I", ""))]) + str(rng.randint(1, 20))
        code = f"{outward} {rng.randint(0, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
        if rng.random() < 0.1:
            code = "NW1 6XE"
            return f"221B Baker Street, London {code}", code
        return f"{rng.randint(1, 300)} {name} {rng.choice(UK_STREET)}, {rng.choice(UK_TOWNS)} {code}", code
    if roll < 0.75:
        town, state = rng.choice(US_TOWNS)
        code = f"{rng.randint(10000, 99999)}" + (f"-{rng.randint(1000, 9999)}" if rng.random() < 0.3 else "")
        return f"{rng.randint(1, 9999)} {name} {rng.choice(US_STREET)}, {town}, {state} {code}", code
    if roll < 0.9:
        code = f"{rng.randint(10000, 99999)}"
        return (
            f"{rng.choice(['Haupt', 'Linden', 'Garten', 'Bahnhof'])}straße {rng.randint(1, 120)}, {code} Berlin",
            code,
        )
    code = f"75{rng.randint(1, 20):03d}"
    return f"{rng.randint(1, 200)} rue de {rng.choice(['Rivoli', 'la Paix', 'Vaugirard'])}, {code} Paris", code


MAKERS = {"EMAIL": email, "PHONE": phone, "CARD": card, "IBAN": iban_number, "SSN": ssn, "NINO": nino}


def identifier_prompts(n: int = 1050, seed: int = 12) -> list[Prompt]:
    """`n` prompts, types in turn, about one in five holding a second identifier too."""
    rng = random.Random(seed)
    kinds = list(TEMPLATES)
    out: list[Prompt] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        text, labels = _fill(rng, kind)
        if rng.random() < 0.2:  # a second identifier of another type, in its own sentence
            other = rng.choice([k for k in kinds if k != kind])
            more, more_labels = _fill(rng, other)
            text, labels = f"{text} Also: {more}", labels + more_labels
        out.append(Prompt(text, labels))
    return out


def _fill(rng: random.Random, kind: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    template = rng.choice(TEMPLATES[kind])
    if kind == "POSTCODE":
        x, code = address(rng)
        return template.format(x=x, o=order_number(rng)), (("POSTCODE", code),)
    x = MAKERS[kind](rng)
    return template.format(x=x, o=order_number(rng)), ((kind, x),)


def _grouped(digits: str) -> str:
    return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def _failing_luhn(rng: random.Random) -> str:
    body = rng.choice("45") + "".join(rng.choice(string.digits) for _ in range(14))
    bad = (int(luhn.calc_check_digit(body)) + rng.randint(1, 9)) % 10
    return body + str(bad)


LOOKALIKES = [
    lambda r: f"Where is order {order_number(r)}? It was due on {r.randint(1, 28)}/{r.randint(1, 12)}/2024.",
    lambda r: f"Order number {r.randint(100000000, 999999999)} has not shipped yet.",
    lambda r: (
        f"The price went from ${r.randint(100, 9999)}.{r.randint(0, 99):02d} to ${r.randint(1, 9)},{r.randint(100, 999)}.99"
    ),
    lambda r: (
        f"Invoice INV-{r.randint(2019, 2025)}-{r.randint(0, 999999):06d} shows a total of €{r.randint(10, 999)},{r.randint(0, 99):02d}"
    ),
    lambda r: (
        f"I am on version {r.randint(1, 20)}.{r.randint(0, 30)}.{r.randint(0, 300)} (build {r.randint(20200101, 20251231)}.{r.randint(1, 9)})"
    ),
    lambda r: f"Tracking code 1Z{r.randint(100, 999)}AA1{r.randint(10**13, 10**14 - 1)} says delivered",
    lambda r: (
        f"tracking RR{r.randint(10**8, 10**9 - 1)}GB and parcel 9400 1{r.randint(100, 999)} {r.randint(1000, 9999)} {r.randint(1000, 9999)} {r.randint(1000, 9999)} {r.randint(10, 99)}"
    ),
    lambda r: f"Reference {_failing_luhn(r)} was rejected",
    lambda r: f"The account ref {_grouped(_failing_luhn(r))} is wrong",
    lambda r: (
        f"Meeting on 2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} at {r.randint(8, 18)}:{r.randint(0, 59):02d}"
    ),
    lambda r: (
        f"Logged 2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} {r.randint(0, 23):02d}:{r.randint(0, 59):02d} UTC, {r.randint(1, 28):02d}.{r.randint(1, 12):02d}.2024"
    ),
    lambda r: f"Ticket #{r.randint(20200101, 20251231)}-{r.randint(0, 9999):04d} was closed",
    lambda r: f"SKU-{r.randint(1000, 9999)}-XL is out of stock; qty {r.randint(1000, 99999)}",
    lambda r: (
        f"ISBN 978-{r.randint(0, 9)}-{r.randint(10, 99)}-{r.randint(100000, 999999)}-{r.randint(0, 9)} arrived damaged"
    ),
    lambda r: f"Server 192.168.{r.randint(0, 255)}.{r.randint(0, 255)} returned error {r.randint(400, 599)}",
    lambda r: f"Timestamp {r.randint(1_600_000_000, 1_750_000_000)} in the logs",
    lambda r: (
        f"Coordinates {r.randint(40, 59)}.{r.randint(1000, 9999)}, -{r.randint(0, 9)}.{r.randint(1000, 9999)} please"
    ),
    lambda r: f"Case 00{r.randint(100000, 999999)} and claim CLM{r.randint(10**7, 10**8 - 1)}",
    lambda r: f"Flight BA {r.randint(100, 9999):04d} on {r.randint(1, 28)} March, seat {r.randint(1, 40)}C",
    lambda r: f"My room is {r.randint(10000, 99999)} in building {r.randint(1, 9)}",
    lambda r: (
        f"Weight {r.randint(1, 99)}.{r.randint(0, 9)} kg, size {r.randint(30, 50)}, {r.randint(2, 12)} items for £{r.randint(10, 500)}.{r.randint(0, 99):02d}"
    ),
    lambda r: f"Serial number SN{r.randint(10**9, 10**10 - 1)} stopped working after {r.randint(2, 30)} days",
    lambda r: (
        f"hash {r.getrandbits(64):016x} and uuid {r.getrandbits(32):08x}-{r.getrandbits(16):04x}-4{r.getrandbits(12):03x}"
    ),
    lambda r: f"Promo code SAVE{r.randint(10, 50)} on {r.randint(1, 12)}.{r.randint(1, 28)}.{r.randint(2020, 2025)}",
    lambda r: f"I paid {r.randint(1, 9)} {r.randint(100, 999)} {r.randint(100, 999)} yen",
    lambda r: f"email me at the usual address, not support@ (order {r.randint(10000, 99999)})",
]


def lookalike_prompts(n: int = 350, seed: int = 34) -> list[Prompt]:
    rng = random.Random(seed)
    return [Prompt(LOOKALIKES[i % len(LOOKALIKES)](rng), ()) for i in range(n)]
