"""Synthetic demo data: seeded intent-style texts over several domains, delivered as batches.

Everything here is made up by the generator (no external data). The four batches tell the story
the demo shows: a cold start, a new domain (drift), a batch with heavy label noise, and a
malformed batch that ingest refuses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# intent -> templates; {slots} are filled from SLOTS.
INTENTS: dict[str, dict[str, list[str]]] = {
    "banking": {
        "check_balance": [
            "what is my {account} balance",
            "how much money is left in my {account} account",
            "show the balance of my {account}",
            "do i have enough in {account} for {thing}",
            "tell me my {account} balance",
            "how much is in my {account} right now",
        ],
        "transfer_money": [
            "send {amount} to {person}",
            "transfer {amount} from {account} to savings",
            "move {amount} into my {account} account",
            "wire {amount} to {person} {day}",
            "i want to pay {person} back {amount}",
            "make a transfer of {amount} to {person}",
        ],
        "report_lost_card": [
            "i lost my {card} card",
            "my {card} card was stolen {day}",
            "block my {card} card it is missing",
            "i cannot find my {card} card anywhere",
            "freeze the {card} card i dropped it",
            "someone took my {card} card",
        ],
        "pay_bill": [
            "pay my {bill} bill",
            "settle the {bill} bill {day}",
            "i need to pay the {bill} invoice of {amount}",
            "schedule the {bill} payment for {day}",
            "pay {amount} for {bill}",
            "has my {bill} bill been paid",
        ],
    },
    "travel": {
        "book_flight": [
            "book a flight to {city} {day}",
            "find me a plane ticket to {city}",
            "i need to fly to {city} {day}",
            "get me a seat on a flight to {city}",
            "are there flights from {city} to {city2} {day}",
            "reserve a flight to {city} for two",
        ],
        "hotel_booking": [
            "book a hotel in {city} for {nights} nights",
            "find a room in {city} {day}",
            "i need a place to stay in {city}",
            "reserve a hotel near the center of {city}",
            "any cheap hotels in {city} {day}",
            "get me a double room in {city}",
        ],
        "cancel_trip": [
            "cancel my trip to {city}",
            "i can no longer travel to {city} {day}",
            "call off the {city} vacation",
            "cancel the booking for {city}",
            "please drop my reservation to {city}",
            "undo my {city} travel plans",
        ],
        "baggage_info": [
            "how many bags can i bring to {city}",
            "what is the luggage limit on my flight",
            "can i take a {thing} in my carry on",
            "my suitcase did not arrive in {city}",
            "how heavy can my checked bag be",
            "is there a fee for a second bag to {city}",
        ],
    },
    "home": {
        "lights_on": [
            "turn on the lights in the {room}",
            "switch the {room} lights on",
            "make the {room} brighter",
            "lights on in the {room} please",
            "can you light up the {room}",
            "power on the {room} lamp",
        ],
        "set_thermostat": [
            "set the temperature to {temp} degrees",
            "make the {room} warmer",
            "turn the heat up in the {room}",
            "cool the {room} down to {temp}",
            "change the thermostat to {temp}",
            "it is too cold in the {room}",
        ],
        "play_music": [
            "play some {genre} music",
            "put on {genre} in the {room}",
            "start my {genre} playlist",
            "i want to hear {genre}",
            "play {genre} songs in the {room}",
            "music please something {genre}",
        ],
        "set_alarm": [
            "wake me up at {time}",
            "set an alarm for {time}",
            "alarm at {time} {day}",
            "remind me to get up at {time}",
            "i need an alarm for {time}",
            "create a {time} wake up alarm",
        ],
    },
    "dining": {
        "order_food": [
            "order a {dish} for delivery",
            "i want {dish} delivered {day}",
            "get me a {dish} from the nearest place",
            "can you order {dish} for two",
            "deliver a large {dish} to my home",
            "place an order for {dish}",
        ],
        "restaurant_reservation": [
            "book a table for {people} at {time}",
            "reserve a table at the {dish} place {day}",
            "get us a table for {people} {day}",
            "make a dinner reservation at {time}",
            "i need a table for {people} tonight",
            "find a free table for {people} at {time}",
        ],
        "find_recipe": [
            "how do i make {dish}",
            "give me a recipe for {dish}",
            "what do i need to cook {dish}",
            "show me how to prepare {dish}",
            "steps to bake {dish} at home",
            "find an easy {dish} recipe",
        ],
        "nutrition_info": [
            "how many calories are in {dish}",
            "is {dish} healthy",
            "what is the protein in a {dish}",
            "how much sugar does {dish} have",
            "nutrition facts for {dish}",
            "is {dish} good for a diet",
        ],
    },
    # Arrives only in batch 2: the new domain the first model has never seen.
    "insurance": {
        "file_claim": [
            "i want to file a claim for my {vehicle}",
            "my {vehicle} was damaged how do i claim",
            "start an insurance claim for the {vehicle}",
            "report an accident with my {vehicle}",
            "submit a claim for water damage in the {room}",
            "open a claim my {thing} was broken",
        ],
        "policy_quote": [
            "how much would insurance for my {vehicle} cost",
            "get me a quote for {vehicle} cover",
            "price of home insurance for a {rooms} room flat",
            "quote for insuring my {thing}",
            "what would a policy for my {vehicle} be",
            "estimate my premium for the {vehicle}",
        ],
        "coverage_question": [
            "does my policy cover {peril}",
            "am i insured against {peril}",
            "is {peril} included in my plan",
            "what does my insurance pay for {peril}",
            "is my {vehicle} covered for {peril}",
            "check if {peril} is in my coverage",
        ],
        "cancel_policy": [
            "cancel my {vehicle} insurance",
            "end my home insurance policy",
            "i want to stop my insurance for the {vehicle}",
            "terminate the policy on my {thing}",
            "close my insurance plan {day}",
            "stop renewing my {vehicle} policy",
        ],
    },
}

SLOTS: dict[str, list[str]] = {
    "account": ["checking", "savings", "joint", "business", "student", "main"],
    "amount": ["$20", "$45", "$100", "$250", "500 dollars", "$1200", "ten euros", "$75"],
    "person": ["mom", "alex", "my landlord", "sam", "jordan", "my sister", "the plumber"],
    "card": ["credit", "debit", "visa", "travel", "company", "platinum"],
    "bill": ["electric", "water", "phone", "internet", "gas", "rent", "credit card"],
    "day": ["today", "tomorrow", "on friday", "next week", "this weekend", "on monday", "tonight"],
    "city": ["paris", "tokyo", "denver", "lisbon", "cairo", "toronto", "seoul", "austin", "rome"],
    "city2": ["boston", "madrid", "oslo", "lima", "dublin", "chicago", "prague"],
    "nights": ["two", "three", "four", "five", "seven"],
    "thing": ["guitar", "laptop", "stroller", "bike", "camera", "tent", "new couch"],
    "room": ["kitchen", "bedroom", "living room", "office", "bathroom", "garage", "hallway"],
    "temp": ["68", "70", "72", "19", "21", "75"],
    "genre": ["jazz", "rock", "classical", "hip hop", "lofi", "country", "techno"],
    "time": ["6 am", "7:30", "noon", "8 pm", "5:45 am", "9 o'clock"],
    "dish": ["pizza", "pad thai", "lasagna", "sushi", "tacos", "ramen", "banana bread", "curry"],
    "people": ["two", "four", "six", "3 people", "a group of 8", "five"],
    "vehicle": ["car", "truck", "motorbike", "van", "scooter", "boat"],
    "rooms": ["two", "three", "four", "one"],
    "peril": ["flooding", "theft", "fire", "hail", "earthquakes", "a burst pipe", "vandalism"],
}

PREFIXES = ["", "", "", "hey ", "please ", "can you ", "i need you to ", "quick question ", "hi "]
SUFFIXES = ["", "", "", " please", " thanks", " now", " asap", " if possible", "?"]

OLD_DOMAINS = ["banking", "travel", "home", "dining"]
NEW_DOMAIN = "insurance"


def all_labels() -> list[str]:
    """Every label the demo uses: the taxonomy declared in the demo workspace's params."""
    return sorted(label for d in INTENTS.values() for label in d)


def _utterance(rng: random.Random, template: str) -> str:
    slots = {k: rng.choice(v) for k, v in SLOTS.items() if "{" + k + "}" in template}
    return (rng.choice(PREFIXES) + template.format(**slots) + rng.choice(SUFFIXES)).strip()


def make_rows(rng: random.Random, domains: list[str], n: int, seen: set[str]) -> pd.DataFrame:
    """n labelled rows, spread evenly over the intents of `domains`, with texts not in `seen`."""
    intents = [(d, i) for d in domains for i in INTENTS[d]]
    rows = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > n * 200:
            raise RuntimeError("the templates cannot make that many distinct texts")
        domain, intent = intents[len(rows) % len(intents)]
        text = _utterance(rng, rng.choice(INTENTS[domain][intent]))
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": intent, "domain": domain})
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=rng.randrange(2**31)).reset_index(drop=True)


@dataclass(frozen=True)
class DemoBatch:
    filename: str
    story: str
    frame: pd.DataFrame


def demo_batches(seed: int = 0, scale: float = 1.0) -> list[DemoBatch]:
    """The four batches of the demo story, deterministic for a seed.

    Args:
        seed: seed of every random choice.
        scale: multiplies the batch sizes (tests use small scales).
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def size(n: int) -> int:
        return max(40, int(n * scale))

    b1 = make_rows(rng, OLD_DOMAINS, size(600), seen)
    b2 = (
        pd.concat(
            [
                make_rows(rng, [NEW_DOMAIN], size(300), seen),
                make_rows(rng, OLD_DOMAINS, size(200), seen),
            ]
        )
        .sample(frac=1.0, random_state=seed)
        .reset_index(drop=True)
    )

    b3 = make_rows(rng, OLD_DOMAINS + [NEW_DOMAIN], size(500), seen)
    labels = all_labels()
    noisy = b3.sample(frac=0.7, random_state=seed + 3).index
    b3.loc[noisy, "label"] = [
        rng.choice([x for x in labels if x != b3.at[i, "label"]]) for i in noisy
    ]

    b4 = make_rows(rng, OLD_DOMAINS, 40, seen).drop(columns=["domain"])
    b4.loc[[3, 11, 27], "text"] = ["", "   ", ""]
    b4.loc[[5, 18], "label"] = ["check_balanse", "book_flite"]
    b4.loc[[30], "label"] = ["weather_forecast"]

    return [
        DemoBatch("01-launch.csv", "cold start: four domains", b1),
        DemoBatch("02-new-domain.jsonl", "drift: a new domain (insurance) arrives", b2),
        DemoBatch("03-noisy-labels.csv", "70% of labels scrambled by a faulty vendor", b3),
        DemoBatch("04-malformed.csv", "malformed: no domain column, blank texts, bad labels", b4),
    ]


def demo_probes(seed: int = 0, per_class: int = 5) -> dict[str, list[str]]:
    """Minimum-functionality probes for every demo intent: plain template sentences.

    Five a class: with three, `gate.min_probe_accuracy` 0.8 meant all three, and one
    borderline sentence decided the cold start by which rows the split happened to train on.
    """
    rng = random.Random(f"probes-{seed}")
    probes = {}
    for intents in INTENTS.values():
        for intent, templates in intents.items():
            probes[intent] = [
                template.format(**{k: rng.choice(v) for k, v in SLOTS.items()
                                   if "{" + k + "}" in template})
                for template in templates[:per_class]
            ]
    return probes


def write_batch(batch: DemoBatch, directory: Path) -> Path:
    """Write a demo batch in the format its file name says."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / batch.filename
    if path.suffix == ".jsonl":
        batch.frame.to_json(path, orient="records", lines=True)
    else:
        batch.frame.to_csv(path, index=False)
    return path
