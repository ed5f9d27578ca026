"""Write the bundled demo federation: four small synthetic text-classification tasks.

    python src/fedpeft/data/demo/make_demo.py           # rewrites the demo-*.tsv files beside it

The text is produced by small template grammars written for fedpeft; it is synthetic demo data,
not a benchmark (see README.md here). The output is deterministic: one fixed seed, Python's
`random.Random` (its `random`, `randrange`, `sample` and `shuffle` are stable across CPython 3
versions) and no other source of randomness. Each task gets 640 train and 200 validation examples with fixed
class counts; no (text_a, text_b) pair occurs twice in a task, so train and validation are disjoint.

Tasks (label ids in brackets):
- demo-sentiment: is a short review of a film, product, meal or stay negative [0] or positive [1]?
  Negation, "X but Y" contrasts and concessive clauses mean no single word decides.
- demo-topic: is a sentence about sport [0], science [1], cooking [2] or travel [3]? An opening
  clause may come from another topic; the main clause decides.
- demo-question: does sentence B answer question A [1] or not [0]? Negatives leave out the asked
  detail, change the person (or object), or tell of another event at the same place and time.
- demo-paraphrase: does B say the same as A [1] or something different [0]? Paraphrases use
  synonyms, the passive voice and moved time phrases; non-paraphrases swap roles, negate, or
  change a person, object, number or time, so both classes share most words.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 20250601
TRAIN, VALIDATION = 640, 200
HERE = Path(__file__).resolve().parent


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def pick(rng: random.Random, items):
    return items[rng.randrange(len(items))]


# ----------------------------------------------------------------------------------------------
# demo-sentiment

SUBJECTS = {
    "film": ["the film", "this thriller", "the documentary", "the sequel", "this comedy",
             "the animated feature", "the period drama", "the horror movie", "the musical",
             "this western", "the new crime series", "the short film"],
    "product": ["the blender", "these headphones", "the backpack", "this kettle", "the desk lamp",
                "the phone case", "the vacuum cleaner", "these running shoes", "this keyboard",
                "the coffee grinder", "the rain jacket", "the electric toothbrush"],
    "meal": ["the risotto", "the curry", "our dinner", "the seafood platter", "the brunch",
             "the ramen", "the tasting menu", "the pizza", "the dessert", "the lunch special",
             "the vegetarian stew", "the Sunday roast"],
    "stay": ["the hotel", "the guesthouse", "our room", "the campsite", "the cabin",
             "the holiday flat", "the hostel", "the seaside inn"],
}
ASPECTS = {
    "film": ["the acting", "the script", "the soundtrack", "the pacing", "the ending",
             "the camera work", "the dialogue", "the lead performance", "the plot"],
    "product": ["the battery", "the build quality", "the price", "the design", "the manual",
                "the motor", "the fit", "the delivery", "the packaging"],
    "meal": ["the service", "the sauce", "the portion", "the wine list", "the seasoning",
             "the staff", "the atmosphere", "the bread", "the starter"],
    "stay": ["the bed", "the view", "the breakfast", "the staff", "the location", "the shower",
             "the wifi", "the check-in"],
}
POSITIVE = ["wonderful", "excellent", "superb", "delightful", "impressive", "charming",
            "brilliant", "lovely", "outstanding", "fantastic", "solid", "satisfying",
            "memorable", "flawless", "great", "pleasant", "terrific", "first-rate"]
NEGATIVE = ["awful", "dreadful", "disappointing", "tedious", "mediocre", "bland", "clumsy",
            "flimsy", "forgettable", "poor", "terrible", "frustrating", "sloppy", "dull",
            "underwhelming", "lousy", "second-rate", "annoying"]
ADVERBS = ["", "", "truly ", "really ", "quite ", "absolutely ", "genuinely ", "rather ", "simply "]
NEGATORS = ["not", "hardly", "far from", "never", "not at all", "by no means"]
OPENERS = ["", "", "", "Honestly, ", "To be fair, ", "After two visits, ", "In short, ",
           "I went in with high hopes and ", "A friend suggested it and ", "Looking back, ",
           "I had read mixed reviews, and "]
POS_VP = ["exceeded my expectations", "was worth every penny", "made my week", "left me smiling",
          "is something I will come back to", "won me over", "deserves the praise it gets",
          "felt like real value"]
NEG_VP = ["was a waste of money", "left me cold", "let me down", "did not live up to the hype",
          "is something I will avoid from now on", "made me regret the choice",
          "fell short in almost every way", "was not worth the wait"]
WHO = ["anyone", "my friends", "a colleague", "my parents", "first-timers", "a picky eater",
       "people on a budget"]


def opener_join(rng, sentence):
    opener = pick(rng, OPENERS)
    return opener + sentence if opener else cap(sentence)


def sentiment_example(rng: random.Random, label: int) -> tuple[str, None]:
    domain = pick(rng, list(SUBJECTS))
    subj = pick(rng, SUBJECTS[domain])
    good, bad = pick(rng, POSITIVE), pick(rng, NEGATIVE)
    want, other = (good, bad) if label == 1 else (bad, good)
    form = rng.randrange(7)
    if form == 0:  # plain verdict
        s = f"{subj} was {pick(rng, ADVERBS)}{want}."
    elif form == 1:  # negated opposite
        s = f"{subj} was {pick(rng, NEGATORS)} {other}."
    elif form == 2:  # contrast: the clause after "but" decides
        a1, a2 = rng.sample(ASPECTS[domain], 2)
        s = f"{a1} was {other}, but {a2} was {pick(rng, ADVERBS)}{want}."
    elif form == 3:  # concession: the main clause decides
        a1 = pick(rng, ASPECTS[domain])
        s = f"although {a1} was {other}, {subj} was {want} overall."
    elif form == 4:  # recommendation
        if label == 1:
            s = f"I would {pick(rng, ['', 'happily ', 'definitely '])}recommend {subj} to {pick(rng, WHO)}."
        else:
            s = f"I would {pick(rng, ['not', 'never', 'hesitate to'])} recommend {subj} to {pick(rng, WHO)}."
    elif form == 5:  # experience verb phrase
        s = f"{subj} {pick(rng, POS_VP if label == 1 else NEG_VP)}."
    else:  # expectation overturned: what it turned out to be decides
        s = f"I expected {subj} to be {other}, but it was {pick(rng, ADVERBS)}{want}."
    return opener_join(rng, s), None


# ----------------------------------------------------------------------------------------------
# demo-topic

TOPIC_ACTORS = [
    ["the striker", "the home team", "the veteran goalkeeper", "the coach", "the sprinter",
     "the tennis champion", "the cycling squad", "the rookie pitcher", "the captain",
     "the marathon runner", "the swim team", "the young winger"],
    ["the researchers", "a team of chemists", "the astronomers", "the lab", "a physicist",
     "the biologists", "the geologists", "a young mathematician", "the engineers",
     "the climate scientists", "a research team", "the doctoral student"],
    ["the chef", "my grandmother", "the baker", "the home cook", "the pastry team",
     "a food blogger", "the line cook", "our neighbour", "the kitchen team", "my uncle"],
    ["the backpackers", "our family", "the tour group", "a solo traveller", "the couple",
     "the students", "my cousin", "the pilgrims", "a retired teacher", "the exchange students"],
]
TOPIC_ACTIONS = [
    ["scored twice in the second half", "won the final on penalties",
     "broke the national record in the relay", "signed a two-year contract with the club",
     "trained for the playoffs at altitude", "was sent off for a late tackle",
     "defended the title in straight sets", "finished third in the time trial",
     "returned to the pitch after a knee injury", "led the league in assists",
     "beat the favourites in extra time", "qualified for the world championships",
     "saved a penalty in the last minute", "set a personal best over ten kilometres"],
    ["published a study on coral bleaching", "measured the spin of a distant pulsar",
     "sequenced the genome of a rare orchid", "found traces of water in a meteorite",
     "proved a conjecture about prime numbers", "tested a new battery electrolyte",
     "recorded a tiny shift in the magnetic field", "mapped the fault line with seismic sensors",
     "observed a comet breaking apart", "grew stem cells on a printed scaffold",
     "identified a new species of beetle", "ran the experiment under a vacuum",
     "modelled how glaciers retreat", "detected a faint signal from a dwarf galaxy"],
    ["simmered the tomato sauce for three hours", "folded the butter into the dough",
     "roasted the peppers over an open flame", "whisked the eggs with a pinch of salt",
     "braised the lamb shoulder in red wine", "kneaded the bread until it was smooth",
     "glazed the carrots with honey", "seared the scallops in a hot pan",
     "fermented cabbage for kimchi", "piped cream onto the eclairs",
     "toasted the spices before grinding them", "baked a lemon tart with a crisp crust",
     "marinated the chicken in yoghurt", "reduced the stock to a thick glaze"],
    ["took the night train to Vienna", "hiked along the coast of Portugal",
     "booked a ferry to the islands", "got lost in the old town of Fez",
     "crossed the border at dawn", "stayed in a hostel near the harbour",
     "rented a camper van in Iceland", "missed the last bus to the village",
     "visited three temples in one afternoon", "flew to Lima with one small bag",
     "cycled from Lyon to the sea", "queued for hours at the passport desk",
     "explored the markets of Hanoi", "spent a week sailing around the fjords"],
]
TOPIC_PREFIXES = [
    ["After the match, ", "Before the derby, ", "During the half-time break, ",
     "On the day of the cup final, "],
    ["During the conference, ", "While the samples were cooling, ",
     "After the lab meeting, ", "Once the telescope data arrived, "],
    ["Before dinner, ", "While the bread was rising, ", "After the market closed, ",
     "Once the oven was hot, "],
    ["On the way to the airport, ", "After checking out of the hotel, ",
     "During the long layover, ", "Once the ferry had docked, "],
]
TOPIC_SUFFIXES = ["", "", "", " last weekend", " on Sunday", " yesterday", " this spring",
                  " for the first time", " despite the rain", " earlier this month"]


def topic_example(rng: random.Random, label: int) -> tuple[str, None]:
    actor = pick(rng, TOPIC_ACTORS[label])
    action = pick(rng, TOPIC_ACTIONS[label])
    prefix = ""
    if rng.random() < 0.45:  # an opening clause, often from another topic
        prefix = pick(rng, TOPIC_PREFIXES[rng.randrange(4)])
    s = f"{actor} {action}{pick(rng, TOPIC_SUFFIXES)}."
    return (prefix + s if prefix else cap(s)), None


# ----------------------------------------------------------------------------------------------
# demo-question

PEOPLE = ["Nadia", "Tomas", "Amara", "Felix", "Priya", "Jonas", "Lucia", "Omar", "Hana", "Mateo",
          "Greta", "Kwame", "Ines", "Viktor", "Mei", "Rafael", "Zara", "Emil", "Leila", "Bruno",
          "Sofia", "Arjun", "Elena", "Hugo"]
OBJECTS = ["red umbrella", "old bicycle", "silver watch", "blue notebook", "wooden chair",
           "leather wallet", "green scarf", "small painting", "new laptop", "spare key",
           "brass lamp", "woollen hat", "toy train", "photo album", "garden hose", "violin case"]
PLACES = ["at the market", "in the library", "at the station", "in the garden", "at the harbour",
          "in the attic", "at the bakery", "in the museum", "at the school", "in the car park",
          "at the post office", "in the cellar"]
TIMES = ["on Monday", "last night", "in March", "at noon", "after lunch", "on Friday evening",
         "two days ago", "before sunrise", "last summer", "during the storm"]
VERBS = [("buy", "bought", "bought"), ("find", "found", "found"), ("lose", "lost", "lost"),
         ("sell", "sold", "sold"), ("paint", "painted", "painted"), ("fix", "fixed", "fixed"),
         ("hide", "hid", "hidden"), ("leave", "left", "left"), ("borrow", "borrowed", "borrowed"),
         ("drop", "dropped", "dropped")]


def _statement(rng, person, verb, obj, place, time) -> str:
    """A statement with the given details (None = left out); the object is always present."""
    _, past, part = verb
    forms = []
    if person is not None:
        core = f"{person} {past} the {obj}"
        tail = " ".join(x for x in (place, time) if x)
        forms.append(f"{core} {tail}".strip() + ".")
        if time:
            forms.append(cap(f"{time}, {core}") + (f" {place}" if place else "") + ".")
        forms.append(f"The {obj} was {part} by {person}" + "".join(f" {x}" for x in (place, time) if x) + ".")
    else:
        forms.append(f"The {obj} was {part}" + "".join(f" {x}" for x in (place, time) if x) + ".")
        forms.append(f"Someone {past} the {obj}" + "".join(f" {x}" for x in (place, time) if x) + ".")
    return pick(rng, forms)


def question_example(rng: random.Random, label: int) -> tuple[str, str]:
    person, obj, place, time = pick(rng, PEOPLE), pick(rng, OBJECTS), pick(rng, PLACES), pick(rng, TIMES)
    verb = pick(rng, VERBS)
    base, past, part = verb
    kind = pick(rng, ["where", "when", "who", "what"])
    if kind == "where":
        q = f"Where did {person} {base} the {obj}?"
    elif kind == "when":
        q = f"When did {person} {base} the {obj}?"
    elif kind == "who":
        q = f"Who {past} the {obj} {place}?"
    else:
        q = f"What did {person} {base} {place}?"

    def keep(detail):  # an optional extra detail, present half of the time
        return detail if rng.random() < 0.5 else None

    if label == 1:  # the asked detail is present and everything named in the question agrees
        if kind == "when":
            a = _statement(rng, person, verb, obj, keep(place), time)
        else:
            a = _statement(rng, person, verb, obj, place, keep(time))
        return q, a
    mode = rng.random()
    if mode < 0.35:  # the asked detail is missing
        if kind == "where":
            a = _statement(rng, person, verb, obj, None, time)
        elif kind == "when":
            a = _statement(rng, person, verb, obj, place, None)
        elif kind == "who":
            a = _statement(rng, None, verb, obj, place, keep(time))
        else:
            a = f"{person} {past} something {place}" + (f" {time}" if rng.random() < 0.5 else "") + "."
        return q, a
    other_person = pick(rng, [p for p in PEOPLE if p != person])
    other_obj = pick(rng, [o for o in OBJECTS if o != obj])
    if mode < 0.65:  # one detail differs: the person (or the object, for "who" questions)
        if kind == "who":
            a = _statement(rng, person, verb, other_obj, place, keep(time))
        else:
            a = _statement(rng, other_person, verb, obj, place, time)
        return q, a
    # another event: a different person does something to a different object
    a = _statement(rng, other_person, pick(rng, VERBS), other_obj, place, time)
    return q, a


# ----------------------------------------------------------------------------------------------
# demo-paraphrase

HUMANS = [("the doctor", "the physician"), ("the lawyer", "the attorney"),
          ("the teacher", "the instructor"), ("the mayor", "the mayor"),
          ("the pilot", "the pilot"), ("the reporter", "the journalist"),
          ("the farmer", "the farmer"), ("the librarian", "the librarian"),
          ("the new manager", "the new boss"), ("my neighbour", "the man next door"),
          ("the nurse", "the nurse"), ("the chef", "the cook"), ("the coach", "the trainer"),
          ("the student", "the pupil")]
# verb: (past, participle, synonym past, synonym participle, objects or None for a person)
ACTIONS = [
    ("bought", "bought", "purchased", "purchased", ["a used car", "the old farmhouse", "{n} tickets", "{n} laptops"]),
    ("repaired", "repaired", "fixed", "fixed", ["the garden fence", "the school roof", "the broken heater", "{n} bicycles"]),
    ("built", "built", "constructed", "constructed", ["a wooden shed", "the new bridge", "{n} greenhouses"]),
    ("finished", "finished", "completed", "completed", ["the annual report", "the training course", "{n} chapters of the book"]),
    ("started", "started", "began", "begun", ["the meeting", "the renovation", "the night shift"]),
    ("cancelled", "cancelled", "called off", "called off", ["the concert", "the trip to the coast", "{n} appointments"]),
    ("chose", "chosen", "selected", "selected", ["the blue curtains", "a quieter office", "{n} candidates"]),
    ("sold", "sold", "sold", "sold", ["the fishing boat", "{n} paintings", "the family piano"]),
    ("helped", "helped", "assisted", "assisted", None),
    ("phoned", "phoned", "called", "called", None),
    ("thanked", "thanked", "thanked", "thanked", None),
    ("hired", "hired", "employed", "employed", None),
    ("warned", "warned", "alerted", "alerted", None),
    ("interviewed", "interviewed", "interviewed", "interviewed", None),
]
NUMBERS = ["two", "three", "four", "five", "six"]
WHEN = ["on Monday", "last week", "yesterday morning", "in early May", "before the storm",
        "after lunch", "on Thursday", "last winter"]


BASE_FORMS = {"bought": "buy", "repaired": "repair", "built": "build", "finished": "finish",
              "started": "start", "cancelled": "cancel", "chose": "choose", "sold": "sell",
              "helped": "help", "phoned": "phone", "thanked": "thank", "hired": "hire",
              "warned": "warn", "interviewed": "interview", "purchased": "purchase",
              "fixed": "fix", "constructed": "construct", "completed": "complete",
              "began": "begin", "called off": "call off", "selected": "select",
              "assisted": "assist", "called": "call", "employed": "employ", "alerted": "alert"}


def _place_time(core: str, when: str | None, front: bool) -> str:
    if when and front:
        return cap(f"{when}, {core}.")
    return cap(core + (f" {when}" if when else "") + ".")


def _active(subj, past, obj, when, front, negated=False):
    verb = f"did not {BASE_FORMS[past]}" if negated else past
    return _place_time(f"{subj} {verb} {obj}", when, front)


def _passive(obj, part, agent, when, front, negated=False):
    be = "were" if obj.split()[0] in NUMBERS else "was"
    return _place_time(f"{obj} {be}{' not' if negated else ''} {part} by {agent}", when, front)


def paraphrase_example(rng: random.Random, label: int) -> tuple[str, str]:
    agent_i = rng.randrange(len(HUMANS))
    agent, agent_syn = HUMANS[agent_i]
    past, part, syn_past, syn_part, objects = pick(rng, ACTIONS)
    n = pick(rng, NUMBERS)
    if objects is None:
        patient_i = pick(rng, [i for i in range(len(HUMANS)) if i != agent_i])
        patient = HUMANS[patient_i][0]
    else:
        patient = pick(rng, objects).replace("{n}", n)
    when = pick(rng, WHEN) if rng.random() < 0.7 else None
    negated = rng.random() < 0.2  # both classes contain negated sentences
    a = _active(agent, past, patient, when, rng.random() < 0.3, negated)

    # B starts as a true paraphrase: synonyms, voice and time position vary.
    b_agent = agent_syn if rng.random() < 0.6 else agent
    b_past, b_part = (syn_past, syn_part) if rng.random() < 0.6 else (past, part)
    b_patient, b_when, b_front, b_negated = patient, when, rng.random() < 0.5, negated
    if label == 0:  # one change of meaning
        changes = ["person", "time", "negation", "number", "swap"]
        if objects is None:
            changes.remove("number")
        else:
            changes.remove("swap")
            if patient.split()[0] not in NUMBERS:
                changes.remove("number")
        if when is None:
            changes.remove("time")
        change = pick(rng, changes + (["swap", "swap"] if "swap" in changes else []))
        if change == "person":
            b_agent = pick(rng, [h[0] for i, h in enumerate(HUMANS) if i != agent_i and h[0] != patient])
        elif change == "time":
            b_when = pick(rng, [w for w in WHEN if w != when])
        elif change == "number":
            b_patient = patient.replace(n, pick(rng, [m for m in NUMBERS if m != n]), 1)
        elif change == "swap":  # roles exchanged: the same words, a different meaning
            b_agent, b_patient = patient, agent
        else:
            b_negated = not negated
    if rng.random() < 0.4:
        b = _passive(b_patient, b_part, b_agent, b_when, b_front, b_negated)
    else:
        b = _active(b_agent, b_past, b_patient, b_when, b_front, b_negated)
    if b == a:  # a paraphrase must not be a copy
        b = _passive(b_patient, b_part, b_agent, b_when, not b_front, b_negated)
    return a, b


# ----------------------------------------------------------------------------------------------

TASKS = {
    # name: (generator, class shares in label order)
    "demo-sentiment": (sentiment_example, (0.45, 0.55)),
    "demo-topic": (topic_example, (0.30, 0.25, 0.25, 0.20)),
    "demo-question": (question_example, (0.50, 0.50)),
    "demo-paraphrase": (paraphrase_example, (0.45, 0.55)),
}


def split_counts(total: int, shares) -> list[int]:
    quotas = [total * s for s in shares]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(shares)), key=lambda c: -(quotas[c] - counts[c]))
    for c in order[: total - sum(counts)]:
        counts[c] += 1
    return counts


def make_task(name: str, rng: random.Random):
    generate, shares = TASKS[name]
    train_counts, val_counts = split_counts(TRAIN, shares), split_counts(VALIDATION, shares)
    seen: set[tuple[str, str]] = set()
    train, validation = [], []
    for label, (n_train, n_val) in enumerate(zip(train_counts, val_counts)):
        rows = []
        attempts = 0
        while len(rows) < n_train + n_val:
            attempts += 1
            if attempts > 200 * (n_train + n_val):
                raise RuntimeError(f"{name}: grammar too small for {n_train + n_val} distinct examples")
            a, b = generate(rng, label)
            key = (a, b or "")
            if key in seen:
                continue
            assert "\t" not in a + (b or "") and "\n" not in a + (b or "")
            seen.add(key)
            rows.append((a, b or "", label))
        train.extend(rows[:n_train])
        validation.extend(rows[n_train:])
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def write(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("text_a\ttext_b\tlabel\n")
        for a, b, label in rows:
            f.write(f"{a}\t{b}\t{label}\n")


def main(out_dir: Path = HERE) -> None:
    for index, name in enumerate(TASKS):
        rng = random.Random(SEED + index)
        train, validation = make_task(name, rng)
        write(out_dir / f"{name}.train.tsv", train)
        write(out_dir / f"{name}.validation.tsv", validation)
        print(f"{name}: {len(train)} train, {len(validation)} validation")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
