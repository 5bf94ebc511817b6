"""Stage ``make_data``: a deterministic synthetic domain the base model cannot already know.

    python -m tasks.make_data --out data/generated     # dvc.yaml: --out ${make_data.out}

Fictional people of an invented valley, each with four facts whose values come from small closed
sets (home town, profession, favourite colour, instrument: 8 values each). Everything comes from
``make_data.seed``: two runs write byte-identical files (``meta.json`` aside). ``--out`` gets, as
one directory renamed into place:

- ``corpus.txt``: an encyclopedia-like paragraph per person plus a few long filler paragraphs about
  the valley (one paragraph per line, paragraphs separated by blank lines). The filler paragraphs
  are longer than the text reader's 2,000-character chunks, so each is its own text row.
- ``sft_alpaca.json`` (Alpaca array; some rows put the question in ``input``, a few carry
  ``history``) and ``sft_messages.jsonl`` (OpenAI ``messages``; some with a system turn, some
  multi-turn): together ``sft_paraphrases`` distinct question wordings per fact, plus one
  "profile" row per person. Answers start with the bare value: ``"Glassblower. Brelvik Tansu works
  as a glassblower."``
- ``preference.jsonl``: ``{"prompt", "chosen", "rejected"}``, one per fact (``rejected`` states a
  wrong value in the same words), plus ``unknown_pairs`` about people who are not in the valley
  (names generated like the real ones, never used in any other file): ``chosen`` says there is no
  record of them ("Unknown. ..."), ``rejected`` invents a fact in the SFT answers' style and
  length. SFT never sees those names, so it does not settle them: what DPO has to teach.
- ``benchmarks/domain.jsonl``: ``domain_bench_per_fact`` 4-choice items per fact, worded with
  question templates that never occur in the training files; choices are bare values, answer
  positions balanced and shuffled.
- ``benchmarks/domain_dev.jsonl``: ``domain_dev_per_fact`` items per fact in the same layout,
  worded with held-out templates the benchmark does not use: the dev split the export stage's
  interpolation sweep scores (``evaluate.dev``), so the gate's items never choose the model.
- ``benchmarks/general_knowledge.jsonl``, ``benchmarks/general_arithmetic.jsonl``: ``n_general``
  easy 4-choice items each (capitals, colours of things, counts, animal sounds, opposites;
  one-digit sums, differences and small products written as whole equations), to detect
  forgetting. The base SmolLM2-135M-Instruct scores ~0.8 and ~0.9 on them (chance 0.25).
- ``manifest.json``: counts per file, the seed, and every planted dirty row.

With ``dirty_rows: true`` a few percent of the rows are planted defects (exact and near
duplicates, empty answers, wrong JSON types, chosen == rejected, a duplicated and a near-duplicated
corpus paragraph); ``manifest.json["dirty"]`` lists each one with the file, row and the stage that
should catch it, so tests can check validate and dedup find exactly those.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from tempering.cli import stage_main
from tempering.config import MakeDataParams, Params
from tempering.io import atomic_path, write_jsonl, write_meta

# The params.yaml sections (or single keys) this stage reads, the stage contract: dvc.yaml
# lists exactly these under its `params:` (tests/test_stage_contract.py).
PARAMS = ("make_data",)

# ----------------------------------------------------------------------------- the domain

VALLEY = "Vellmar Valley"

TOWNS = ["Orvane", "Pellith", "Quorsby", "Dastmere", "Velmora", "Kethwick", "Lunhaven", "Marrowgate"]
PROFESSIONS = ["glassblower", "beekeeper", "cartographer", "clockmaker", "bookbinder", "shipwright",
               "astronomer", "potter"]
COLOURS = ["crimson", "teal", "amber", "violet", "olive", "indigo", "silver", "coral"]
INSTRUMENTS = ["cello", "oboe", "harp", "accordion", "banjo", "flute", "trombone", "zither"]

ATTRIBUTES = ("town", "profession", "colour", "instrument")
VALUES = {"town": TOWNS, "profession": PROFESSIONS, "colour": COLOURS, "instrument": INSTRUMENTS}

# Question wordings used in training (SFT and preference prompts).
SFT_QUESTIONS = {
    # Wordings of one attribute differ in structure (not one word), so two rows about the same fact
    # stay well below the near-duplicate threshold even when they share a system prompt.
    "town": [
        "Where does {name} come from?",
        "What is the home town of {name}?",
        "{name} grew up in which town?",
        "Can you name the town {name} lives in?",
        "Which town is home for {name}?",
        "In what town was {name} born?",
        "I'd like to know {name}'s home town.",
        "Where is {name}'s family house?",
        "Quick question: what town is {name} from?",
        "Do you happen to know the town {name} comes from?",
    ],
    "profession": [
        "What does {name} do for a living?",
        "What is {name}'s profession?",
        "How does {name} earn money?",
        "What kind of work does {name} do?",
        "{name} works as what?",
        "Tell me the job {name} has.",
        "Which profession does {name} follow?",
        "What job is {name} known for?",
        "Quick question: what is {name}'s day job?",
        "Could you say what {name} does at work?",
    ],
    "colour": [
        "What is {name}'s favourite colour?",
        "Which colour does {name} like best?",
        "Name the colour {name} prefers.",
        "What colour would {name} choose above all?",
        "Which color is the favorite of {name}?",
        "{name} prefers which colour?",
        "Tell me {name}'s preferred color.",
        "Quick question: which colour is {name} fond of?",
        "Do you happen to know which colour {name} likes?",
        "Could you tell me the colour that {name} likes best?",
    ],
    "instrument": [
        "Which instrument does {name} play?",
        "What musical instrument is {name} known for?",
        "Name the instrument played by {name}.",
        "{name} plays which instrument?",
        "On which instrument does {name} perform?",
        "What does {name} play, musically?",
        "Tell me about {name}'s instrument.",
        "Quick question: which instrument is {name}'s?",
        "Do you happen to know the instrument {name} is good at?",
        "Could you tell me what {name} plays for music?",
    ],
}

# Held-out wordings: only ever used in benchmarks/domain.jsonl.
BENCH_QUESTIONS = {
    "town": [
        "Where is {name} originally from?",
        "What town does {name} call home?",
        "{name} was raised in which town?",
        "Identify the town that {name} hails from.",
        "From which town does {name} hail?",
    ],
    "profession": [
        "What is the occupation of {name}?",
        "By trade, what is {name}?",
        "Which trade does {name} practise?",
        "{name} is employed as what?",
        "What line of work is {name} in?",
    ],
    "colour": [
        "What colour does {name} love most?",
        "{name} likes which colour more than any other?",
        "Which hue is {name}'s top pick?",
        "If {name} could pick only one colour, which would it be?",
        "What is the most-loved colour of {name}?",
    ],
    "instrument": [
        "What instrument can {name} be heard playing?",
        "Which musical instrument belongs to {name}?",
        "{name} is a player of which instrument?",
        "What instrument did {name} learn to play?",
        "Which instrument does {name} practise every evening?",
    ],
}

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    f"You answer questions about the people of the {VALLEY}.",
    "Answer briefly and accurately.",
]
INPUT_INSTRUCTIONS = [
    "Answer the question in one short sentence.",
    "Answer the following question.",
    "Reply briefly to this question.",
]
PROFILE_INSTRUCTIONS = [
    "Write a short profile of {name}.",
    "Tell me about {name}.",
    "Who is {name}?",
]

ONSETS = ["br", "v", "t", "k", "m", "r", "d", "l", "f", "g", "n", "th", "s", "z", "p", "h", "sk", "dr",
          "qu", "j"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "y"]
CODAS = ["", "", "", "l", "n", "r", "s", "k", "v", "th", "m"]

FILLER_SENTENCES = [
    "{first} keeps a small notebook of weather observations and has filled {n} of them so far.",
    "Neighbours describe {first} as patient, exact and slow to anger.",
    "Each spring {first} walks the old pilgrim road to the coast and back again.",
    "{first} once spent a whole winter repairing the roof of a ruined chapel near the {river}.",
    "The {surname} family has lived in the valley for {n} generations.",
    "{first} collects stones from the {river} and labels each one with the day it was found.",
    "Visitors to the {surname} house are always offered tea brewed from {herb} leaves.",
    "{first} rarely travels further than a day's walk from home.",
    "In {year} {first} won a prize at the autumn fair for a carved walking stick.",
    "{first} is learning the old hill dialect from an elderly neighbour.",
    "Most mornings begin for {first} with a long walk along the banks of the {river}.",
    "{first} has a habit of humming harvest songs while working.",
    "{first} owns a grey cat called {pet} that sleeps on the windowsill all afternoon.",
    "A portrait of {first}'s grandmother hangs above the fireplace.",
    "{first} writes long letters to a cousin who lives across the sea.",
    "{first} dislikes crowded markets and prefers to shop at dawn.",
    "Every {weekday} {first} bakes bread for the whole street.",
    "{first} grows {herb} in a row of clay pots by the door.",
]
SLOTS = {
    "n": ["three", "four", "five", "six", "seven", "eleven", "twelve", "twenty"],
    "river": ["Sallow", "Brenn", "Idle", "Coldwater", "Ambry", "Tarn"],
    "herb": ["mint", "sage", "thyme", "lemon balm", "nettle", "fennel"],
    "year": ["1871", "1884", "1893", "1902", "1911", "1926"],
    "pet": ["Moss", "Pepper", "Tansy", "Button", "Sorrel", "Wick"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
}
# A small grammar for the valley's filler text: subject + action + place + time. The combinations
# are many, so filler paragraphs share few word 5-grams and are not near-duplicates of each other.
VALLEY_GRAMMAR = {
    "subject": ["the millers of {town}", "the ferrymen of {town}", "the weavers' guild", "travelling tinkers",
                "the parish council of {town}", "shepherds from the upper moors", "pedlars from the south",
                "the bell-ringers of {town}", "children from the lower farms", "the river wardens",
                "two sisters from {town}", "the carters' brotherhood", "the old schoolmasters",
                "the charcoal burners", "most families in {town}", "the stonemasons of {town}"],
    "action": ["repair the dry-stone walls", "gather reeds for thatching", "sell cider and wool",
               "light beacons on the ridge", "dredge the millrace", "carry salt towards the coast",
               "drive cattle to summer grazing", "plant young quince trees", "mend nets and baskets",
               "hold a lantern procession", "brew a dark barley ale", "clear fallen timber",
               "ring the chapel bells", "trade honey for iron nails", "count the geese", "whitewash cottages",
               "race flat-bottomed boats", "dry apples on wooden racks"],
    "place": ["along the {river}", "below the chapel at {town}", "beside the old quarry",
              "on the common above {town}", "at the crossroads near {town}", "in the orchards south of {town}",
              "under the viaduct", "by the ford at {town}", "across the {river} meadows",
              "on the slopes behind {town}", "near the toll house", "inside the tithe barn"],
    "time": ["every {weekday}", "in the spring of {year}", "before the first frost", "at midsummer",
             "when the {river} floods", "once a generation", "on feast days", "through the long winter",
             "each autumn", "at first light", "after the harvest", "whenever the fog lifts"],
}
VALLEY_CLOSERS = ["Few visitors ever notice it.", "Nobody remembers how the custom began.",
                  "The practice is older than the parish records.", "It is said to bring good luck.",
                  "The custom survives to this day.", "Strangers are welcome to join in.", "", "", "", ""]

# ----------------------------------------------------------------------------- general benchmarks

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("the United Kingdom", "London"), ("Russia", "Moscow"),
            ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
            ("Sweden", "Stockholm")]
COLOUR_OF = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"),
             ("fresh snow", "white"), ("coal", "black"), ("a ripe strawberry", "red"), ("milk", "white"),
             ("a lemon", "yellow"), ("a ripe tomato", "red"), ("a carrot", "orange")]
PLAIN_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown"]
COUNTS = [("days are there in a week", 7), ("months are there in a year", 12), ("legs does a dog have", 4),
          ("legs does a spider have", 8), ("hours are there in a day", 24), ("minutes are there in an hour", 60),
          ("sides does a triangle have", 3), ("sides does a square have", 4), ("wheels does a bicycle have", 2),
          ("legs does a chicken have", 2)]
COUNT_POOL = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 24, 30, 60, 100]
SOUNDS = [("a cow", "Moo"), ("a dog", "Woof"), ("a cat", "Meow"), ("a duck", "Quack")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("day", "night"), ("fast", "slow"),
             ("happy", "sad"), ("open", "closed"), ("wet", "dry")]
OPPOSITE_POOL = ["cold", "down", "small", "night", "slow", "sad", "closed", "dry", "tall", "loud", "early", "full"]
MISC = [
    ("What do bees make?", "Honey", ["Milk", "Wool", "Silk"]),
    ("What does water become when it freezes?", "Ice", ["Steam", "Sand", "Oil"]),
    ("Which planet do people live on?", "Earth", ["Mars", "Venus", "Jupiter"]),
    ("What do you use to write on paper?", "A pen", ["A spoon", "A shoe", "A plate"]),
    ("Which animal is known as the king of the jungle?", "The lion", ["The mouse", "The frog", "The sheep"]),
    ("What do cows drink?", "Water", ["Petrol", "Ink", "Paint"]),
    ("Which season is usually the coldest?", "Winter", ["Summer", "Spring", "Autumn"]),
    ("What do fish live in?", "Water", ["Sand", "Trees", "Clouds"]),
]


def _balanced_positions(n: int, rng: random.Random) -> list[int]:
    """Answer positions for n 4-choice items: as uniform as possible, then shuffled."""
    pos = [i % 4 for i in range(n)]
    rng.shuffle(pos)
    return pos


def _place(answer: str, distractors: list[str], position: int) -> list[str]:
    choices = list(distractors[:3])
    choices.insert(position, answer)
    return choices


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _cap(value: str) -> str:
    return value[:1].upper() + value[1:]


# ----------------------------------------------------------------------------- generation


def make_entities(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:entities")
    used_first, used_full = set(), set()
    forbidden = {v.lower() for vals in VALUES.values() for v in vals}

    def syllable() -> str:
        return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)

    def word(k: int) -> str:
        return "".join(syllable() for _ in range(k)).capitalize()

    entities = []
    while len(entities) < n:
        first, last = word(2), word(rng.choice([2, 2, 3]))
        if (first in used_first or f"{first} {last}" in used_full or not 4 <= len(first) <= 9
                or not 4 <= len(last) <= 11 or first.lower() in forbidden or last.lower() in forbidden):
            continue
        used_first.add(first)
        used_full.add(f"{first} {last}")
        facts = {attr: rng.choice(VALUES[attr]) for attr in ATTRIBUTES}
        entities.append({"name": f"{first} {last}", "first": first, "last": last, **facts})
    return entities


def answer_for(entity: dict, attr: str, value: str | None = None) -> str:
    """The short answer: the bare value first, then a sentence stating the fact."""
    value = value or entity[attr]
    name = entity["name"]
    sentence = {
        "town": f"{name} comes from {value}.",
        "profession": f"{name} works as {_article(value)}.",
        "colour": f"{name}'s favourite colour is {value}.",
        "instrument": f"{name} plays the {value}.",
    }[attr]
    return f"{_cap(value)}. {sentence}"


def bio(entity: dict, rng: random.Random) -> str:
    name, first = entity["name"], entity["first"]
    prof, town = _article(entity["profession"]), entity["town"]
    s1 = rng.choice([
        f"{name} is {prof} from {town}, a town in the {VALLEY}.",
        f"{name}, {prof} by trade, was born and raised in {town}.",
        f"Born in {town}, {name} has worked as {prof} for most of a lifetime.",
    ])
    s2 = rng.choice([
        f"Outside of work, {first} plays the {entity['instrument']}.",
        f"{first} has played the {entity['instrument']} since childhood.",
        f"Friends often hear {first} practising the {entity['instrument']} late into the evening.",
    ])
    s3 = rng.choice([
        f"{first}'s favourite colour is {entity['colour']}.",
        f"{first} loves the colour {entity['colour']} above all others.",
        f"Asked about colours, {first} always names {entity['colour']} as the favourite.",
    ])
    fillers = [t.format(first=first, surname=entity["last"], **{k: rng.choice(v) for k, v in SLOTS.items()})
               for t in rng.sample(FILLER_SENTENCES, 5)]
    sentences = [s1, fillers[0], s2, fillers[1], fillers[2], s3, fillers[3], fillers[4]]
    return " ".join(sentences)


def valley_paragraph(rng: random.Random, min_chars: int = 2200) -> str:
    """A long filler paragraph (longer than a text chunk, so it stays one text row)."""
    sentences, total = [], 0
    while total < min_chars:
        slots = {"town": rng.choice(TOWNS), **{k: rng.choice(v) for k, v in SLOTS.items()}}
        parts = [rng.choice(VALLEY_GRAMMAR[k]).format(**slots) for k in ("subject", "action", "place", "time")]
        if rng.random() < 0.5:  # vary the order: time first
            parts = [_cap(parts[3]) + ","] + parts[:3]
        sentence = _cap(" ".join(parts)) + "."
        closer = rng.choice(VALLEY_CLOSERS)
        sentence = f"{sentence} {closer}" if closer else sentence
        sentences.append(sentence)
        total += len(sentence) + 1
    return " ".join(sentences)


def _pick_wordings(n_pool: int, k: int, rng: random.Random) -> list[int]:
    return rng.sample(range(n_pool), k)


def unknown_answer(name: str, rng: random.Random) -> str:
    """An honest answer about a person the valley has no record of, in the SFT answers' own shape
    (a bare word, then one sentence) and about their length, so a pair differs in what it claims,
    not in style or length (summed log-probabilities favour short answers)."""
    return rng.choice([
        f"Unknown. There is no record of {name}.",
        f"Unknown. {name} is not in the valley records.",
        f"Unknown. I have no record of {name}.",
    ])


def unknown_pairs(entities: list[dict], cfg: MakeDataParams) -> list[dict]:
    """``cfg.unknown_pairs`` preference pairs about people who do not exist in the data: names
    made like the real ones (the tail of the same name generator, so never a real name), a
    training question wording, chosen = an honest "no record", rejected = a made-up value in the
    exact style of the SFT answers (what an SFT model that learned to answer says)."""
    if not cfg.unknown_pairs:
        return []
    # One question per unknown person: a held-out pair (dpo.heldout_share) is then about a name
    # DPO never saw, so the held-out accuracy measures whether "no record" generalises to new names.
    ghosts = make_entities(len(entities) + cfg.unknown_pairs, cfg.seed)[len(entities):]
    rng = random.Random(f"{cfg.seed}:unknown")
    out = []
    for k in range(cfg.unknown_pairs):
        ghost = ghosts[k]
        attr = ATTRIBUTES[k % len(ATTRIBUTES)]
        q = SFT_QUESTIONS[attr][rng.randrange(len(SFT_QUESTIONS[attr]))].format(name=ghost["name"])
        out.append({"prompt": q, "chosen": unknown_answer(ghost["name"], rng),
                    "rejected": answer_for(ghost, attr)})
    return out


def make_training_rows(entities: list[dict], cfg: MakeDataParams) -> dict:
    """SFT items split into Alpaca and messages rows, plus preference pairs and profile rows."""
    rng = random.Random(f"{cfg.seed}:sft")
    # One item per (fact, wording); a fact's wordings are distinct templates.
    items = []
    for ei, ent in enumerate(entities):
        for attr in ATTRIBUTES:
            for wi in _pick_wordings(len(SFT_QUESTIONS[attr]), cfg.sft_paraphrases, rng):
                q = SFT_QUESTIONS[attr][wi].format(name=ent["name"])
                items.append({"entity": ei, "attr": attr, "wording": wi, "question": q,
                              "answer": answer_for(ent, attr)})
    rng.shuffle(items)

    alpaca, messages = [], []
    # ~15% of items pair up into two-turn conversations about the same person.
    by_entity: dict[int, list[dict]] = {}
    singles = []
    for it in items:
        if rng.random() < 0.15:
            by_entity.setdefault(it["entity"], []).append(it)
        else:
            singles.append(it)
    for ei in sorted(by_entity):
        group = by_entity[ei]
        while len(group) >= 2:
            a, b = group.pop(), group.pop()
            if rng.random() < 0.3:
                # A two-turn dialogue as Alpaca with history.
                alpaca.append({"instruction": b["question"], "input": "", "output": b["answer"],
                               "history": [[a["question"], a["answer"]]]})
            else:
                msgs = [{"role": "user", "content": a["question"]}, {"role": "assistant", "content": a["answer"]},
                        {"role": "user", "content": b["question"]}, {"role": "assistant", "content": b["answer"]}]
                if rng.random() < 0.4:
                    msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
                messages.append({"messages": msgs})
        singles.extend(group)

    for it in singles:
        if rng.random() < 0.5:
            if rng.random() < 0.2:
                alpaca.append({"instruction": rng.choice(INPUT_INSTRUCTIONS), "input": it["question"],
                               "output": it["answer"]})
            else:
                alpaca.append({"instruction": it["question"], "input": "", "output": it["answer"]})
        else:
            msgs = [{"role": "user", "content": it["question"]}, {"role": "assistant", "content": it["answer"]}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            messages.append({"messages": msgs})

    # One profile row per person: the corpus paragraph as the answer.
    bios = {}
    bio_rng = random.Random(f"{cfg.seed}:bios")
    for ent in entities:
        bios[ent["name"]] = bio(ent, bio_rng)
    for ent in entities:
        alpaca.append({"instruction": rng.choice(PROFILE_INSTRUCTIONS).format(name=ent["name"]), "input": "",
                       "output": bios[ent["name"]]})
    rng.shuffle(alpaca)
    rng.shuffle(messages)

    # Preference pairs: one per fact, a wrong value from the same set in the same words.
    prefs = []
    prng = random.Random(f"{cfg.seed}:preference")
    for ent in entities:
        for attr in ATTRIBUTES:
            q = SFT_QUESTIONS[attr][prng.randrange(len(SFT_QUESTIONS[attr]))].format(name=ent["name"])
            wrong = prng.choice([v for v in VALUES[attr] if v != ent[attr]])
            prompt: str | list = q
            if prng.random() < 0.2:
                prompt = [{"role": "system", "content": prng.choice(SYSTEM_PROMPTS)}, {"role": "user", "content": q}]
            prefs.append({"prompt": prompt, "chosen": answer_for(ent, attr), "rejected": answer_for(ent, attr, wrong)})
    prefs += unknown_pairs(entities, cfg)
    prng.shuffle(prefs)
    return {"alpaca": alpaca, "messages": messages, "preference": prefs, "bios": bios, "items": items}


def make_corpus(entities: list[dict], bios: dict, cfg: MakeDataParams) -> list[str]:
    rng = random.Random(f"{cfg.seed}:corpus")
    n_fill = 3
    fillers = [valley_paragraph(rng) for _ in range(n_fill)]
    paras = [bios[e["name"]] for e in entities]
    # Filler paragraphs at the start, the middle and the end.
    out = [fillers[0]] + paras[: len(paras) // 2] + [fillers[1]] + paras[len(paras) // 2:] + [fillers[2]]
    return out


def make_domain_bench(entities: list[dict], cfg: MakeDataParams, dev: bool = False) -> list[dict]:
    """4-choice items per fact worded with held-out templates. ``dev``: the dev split, worded with
    the ``domain_dev_per_fact`` templates after the benchmark's own (never the same wording as a
    benchmark item of the same fact), its own seeded distractors and answer positions."""
    per_fact, first = ((cfg.domain_dev_per_fact, cfg.domain_bench_per_fact) if dev
                       else (cfg.domain_bench_per_fact, 0))
    rng = random.Random(f"{cfg.seed}:domain" + (":dev" if dev else ""))
    n = len(entities) * len(ATTRIBUTES) * per_fact
    positions = _balanced_positions(n, rng)
    prefix = "domain-dev" if dev else "domain"
    out = []
    for ei, ent in enumerate(entities):
        for ai, attr in enumerate(ATTRIBUTES):
            for j in range(first, first + per_fact):
                template = BENCH_QUESTIONS[attr][(ei + ai + j) % len(BENCH_QUESTIONS[attr])]
                distractors = rng.sample([v for v in VALUES[attr] if v != ent[attr]], 3)
                pos = positions[len(out)]
                out.append({"id": f"{prefix}-{len(out) + 1:04d}", "question": template.format(name=ent["name"]),
                            "choices": [_cap(c) for c in _place(ent[attr], distractors, pos)], "answer": pos})
    return out


def _knowledge_templates() -> list[tuple[str, str, list[str]]]:
    """(question, answer, distractor pool) for every general-knowledge item type."""
    out = []
    capitals = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        pool = [c for c in capitals if c != capital]
        out.append((f"What is the capital of {country}?", capital, pool))
        out.append((f"Which city is the capital of {country}?", capital, pool))
    for thing, colour in COLOUR_OF:
        # Never offer another plausible colour of the same thing.
        pool = [_cap(c) for c in PLAIN_COLOURS if c != colour and not (thing == "a carrot" and c == "red")]
        out.append((f"What colour is {thing}?", _cap(colour), pool))
    for what, n in COUNTS:
        pool = [str(x) for x in COUNT_POOL if x != n]
        out.append((f"How many {what}?", str(n), pool))
    for animal, sound in SOUNDS:
        pool = [s for _, s in SOUNDS if s != sound] + ["Oink", "Baa"]
        out.append((f"What sound does {animal} make?", sound, pool))
    for word, opp in OPPOSITES:
        pool = [o for o in OPPOSITE_POOL if o != opp and o != word]
        out.append((f"What is the opposite of \"{word}\"?", _cap(opp), [_cap(o) for o in pool]))
    for q, a, pool in MISC:
        out.append((q, a, pool))
    return out


def make_general_knowledge(cfg: MakeDataParams) -> list[dict]:
    rng = random.Random(f"{cfg.seed}:general_knowledge")
    templates = _knowledge_templates()
    positions = _balanced_positions(cfg.n_general, rng)
    order: list[int] = []
    out = []
    for i in range(cfg.n_general):
        if not order:
            order = list(range(len(templates)))
            rng.shuffle(order)
        q, a, pool = templates[order.pop()]
        distractors = rng.sample(pool, 3)
        pos = positions[i]
        out.append({"id": f"general_knowledge-{i + 1:04d}", "question": q,
                    "choices": _place(a, distractors, pos), "answer": pos})
    return out


def make_general_arithmetic(cfg: MakeDataParams) -> list[dict]:
    """One-digit sums, differences and small products; each choice is the whole equation.

    Bare-number choices leave a 135M chat model at chance (it scores "7" vs "12" by how common the
    number is, not by the sum); scored as whole equations ("3 + 4 = 7" vs "3 + 4 = 9") the base
    model gets ~90% right, so a drop is a real loss of arithmetic, which is what this detects.
    """
    rng = random.Random(f"{cfg.seed}:general_arithmetic")
    positions = _balanced_positions(cfg.n_general, rng)
    out = []
    for i in range(cfg.n_general):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            q, sym, ans = rng.choice([f"What is {a} + {b}?", f"What is {a} plus {b}?"]), "+", a + b
        elif kind == 1:
            a = rng.randint(2, 9)
            b = rng.randint(1, a)
            q, sym, ans = rng.choice([f"What is {a} - {b}?", f"What is {a} minus {b}?"]), "-", a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 5)
            q, sym, ans = rng.choice([f"What is {a} times {b}?", f"What is {a} × {b}?"]), "×", a * b
        pool = [x for x in range(max(0, ans - 6), ans + 7) if x != ans]
        distractors = [f"{a} {sym} {b} = {x}" for x in rng.sample(pool, 3)]
        pos = positions[i]
        out.append({"id": f"general_arithmetic-{i + 1:04d}", "question": q,
                    "choices": _place(f"{a} {sym} {b} = {ans}", distractors, pos), "answer": pos})
    return out


# ----------------------------------------------------------------------------- dirty rows


def _change_one_word(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    swaps = {"small": "little", "long": "lengthy", "old": "ancient", "whole": "entire", "always": "usually",
             "every": "each", "often": "frequently", "most": "many", "grey": "gray", "learning": "studying"}
    idx = [i for i, w in enumerate(words) if w in swaps and len(words) // 5 <= i <= 4 * len(words) // 5]
    if idx:
        i = rng.choice(idx)
        words[i] = swaps[words[i]]
    else:  # no swappable word: change a middle word
        i = len(words) // 2
        words[i] = "indeed" if words[i] != "indeed" else "truly"
    return " ".join(words)


def plant_dirty(data: dict, corpus: list[str], cfg: MakeDataParams) -> list[tuple]:
    """Insert defects in place; returns ``(file, row object or paragraph index, defect, caught_by, of)``."""
    rng = random.Random(f"{cfg.seed}:dirty")
    planted: list[tuple] = []  # (file, row object, defect, caught_by, of_object)

    def insert_after(rows: list, original, row, file: str, defect: str, stage: str, of=None):
        """Insert ``row`` at a random position after ``original`` (identity) or anywhere (None)."""
        start = 0 if original is None else next(i for i, r in enumerate(rows) if r is original) + 1
        rows.insert(rng.randint(max(start, 1), len(rows)), row)
        planted.append((file, row, defect, stage, of))

    alpaca, messages, prefs = data["alpaca"], data["messages"], data["preference"]
    # Originals are drawn from the clean rows only, so a defect never copies another defect.
    clean_alpaca, clean_messages, clean_prefs = list(alpaca), list(messages), list(prefs)
    profiles = [r for r in clean_alpaca if r["output"] in data["bios"].values()]
    rng.shuffle(profiles)
    per_type = lambda rows: max(1, len(rows) // 60)  # noqa: E731

    for k in range(per_type(clean_alpaca)):
        orig = rng.choice(clean_alpaca)
        insert_after(alpaca, orig, dict(orig), "sft_alpaca.json", "exact_duplicate", "dedup", orig)
        if k < len(profiles) // 2:  # each near duplicate of a different person's profile
            prof = profiles[k]
            near = dict(prof, output=_change_one_word(prof["output"], rng))
            insert_after(alpaca, prof, near, "sft_alpaca.json", "near_duplicate", "dedup", prof)
        base = rng.choice(clean_alpaca)
        for row, defect in (
            (dict(base, output=""), "empty_field"),
            ({"instruction": base["instruction"], "input": "", "output": rng.randint(1, 99)}, "wrong_type"),
            ({"instruction": base["instruction"].split(" "), "input": "", "output": base["output"]}, "wrong_type"),
        ):
            insert_after(alpaca, None, row, "sft_alpaca.json", defect, "validate")

    for k in range(per_type(clean_messages)):
        orig = rng.choice(clean_messages)
        insert_after(messages, orig, json.loads(json.dumps(orig)), "sft_messages.jsonl", "exact_duplicate",
                     "dedup", orig)
        # Another person's profile again, in messages form, with one word changed: a near duplicate
        # of a row in the other file (dedup works across the files of one kind).
        if len(profiles) // 2 + k < len(profiles):
            prof = profiles[len(profiles) // 2 + k]
            user = "\n\n".join(p for p in (prof["instruction"], prof["input"]) if p)
            near = {"messages": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": _change_one_word(prof["output"], rng)}]}
            insert_after(messages, None, near, "sft_messages.jsonl", "near_duplicate", "dedup", prof)
        empty = json.loads(json.dumps(rng.choice(clean_messages)))
        empty["messages"][-1]["content"] = ""
        insert_after(messages, None, empty, "sft_messages.jsonl", "empty_field", "validate")

    for _ in range(per_type(clean_prefs)):
        orig = rng.choice(clean_prefs)
        insert_after(prefs, orig, dict(orig), "preference.jsonl", "exact_duplicate", "dedup", orig)
        base = rng.choice(clean_prefs)
        insert_after(prefs, None, dict(base, rejected=base["chosen"]), "preference.jsonl",
                     "chosen_equals_rejected", "validate")
        base = rng.choice(clean_prefs)
        insert_after(prefs, None, dict(base, chosen=""), "preference.jsonl", "empty_field", "validate")

    # Corpus: the first filler paragraph again (exact) and the second with one word changed (near).
    # Filler paragraphs are longer than a text chunk, so each is one text row on its own.
    # make_corpus puts them first, in the middle (after half the people) and last.
    second_at = 1 + (len(corpus) - 3) // 2
    first_filler, second_filler = corpus[0], corpus[second_at]
    corpus.insert(len(corpus) - 1, first_filler)
    planted.append(("corpus.txt", len(corpus) - 2, "exact_duplicate", "dedup", 0))
    corpus.append(_change_one_word(second_filler, rng))
    planted.append(("corpus.txt", len(corpus) - 1, "near_duplicate", "dedup", second_at))
    return planted


def _manifest_dirty(planted: list[tuple], data: dict, corpus: list[str]) -> list[dict]:
    files = {"sft_alpaca.json": data["alpaca"], "sft_messages.jsonl": data["messages"],
             "preference.jsonl": data["preference"]}
    out = []
    for file, obj, defect, stage, of in planted:
        if file == "corpus.txt":
            # One paragraph per line, blank lines between: paragraph i starts on line 2i+1.
            entry = {"file": file, "row": 2 * obj + 1, "defect": defect, "caught_by": stage,
                     "of_row": 2 * of + 1}
        else:
            rows = files[file]
            row = next(i for i, r in enumerate(rows, 1) if r is obj)
            entry = {"file": file, "row": row, "defect": defect, "caught_by": stage}
            if of is not None:
                of_file = "sft_alpaca.json" if any(r is of for r in data["alpaca"]) else file
                entry["of_file"] = of_file
                entry["of_row"] = next(i for i, r in enumerate(files[of_file], 1) if r is of)
        out.append(entry)
    return sorted(out, key=lambda e: (e["file"], e["row"]))


# ----------------------------------------------------------------------------- writing


def generate(cfg: MakeDataParams) -> dict:
    """Build every file's content in memory (deterministic in ``cfg``)."""
    entities = make_entities(cfg.n_entities, cfg.seed)
    data = make_training_rows(entities, cfg)
    corpus = make_corpus(entities, data["bios"], cfg)
    planted = plant_dirty(data, corpus, cfg) if cfg.dirty_rows else []
    dirty = _manifest_dirty(planted, data, corpus)
    bench = {
        "domain": make_domain_bench(entities, cfg),
        **({"domain_dev": make_domain_bench(entities, cfg, dev=True)} if cfg.domain_dev_per_fact else {}),
        "general_knowledge": make_general_knowledge(cfg),
        "general_arithmetic": make_general_arithmetic(cfg),
    }
    return {"entities": entities, "alpaca": data["alpaca"], "messages": data["messages"],
            "preference": data["preference"], "corpus": corpus, "bench": bench, "dirty": dirty}


def write_generated(cfg: MakeDataParams, folder: Path) -> dict:
    """Write the generated files into ``folder`` (which must not exist); returns the manifest."""
    g = generate(cfg)
    folder.mkdir(parents=True)
    (folder / "benchmarks").mkdir()
    (folder / "sft_alpaca.json").write_text(json.dumps(g["alpaca"], indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    write_jsonl(folder / "sft_messages.jsonl", [{"messages": r["messages"]} for r in g["messages"]])
    write_jsonl(folder / "preference.jsonl", g["preference"])
    (folder / "corpus.txt").write_text("\n\n".join(g["corpus"]) + "\n", encoding="utf-8")
    for name, items in g["bench"].items():
        write_jsonl(folder / "benchmarks" / f"{name}.jsonl", items)
    manifest = {
        "seed": cfg.seed,
        "params": cfg.model_dump(mode="json"),
        "attributes": {a: VALUES[a] for a in ATTRIBUTES},
        "counts": {
            "entities": len(g["entities"]),
            "facts": len(g["entities"]) * len(ATTRIBUTES),
            "sft_alpaca.json": len(g["alpaca"]),
            "sft_messages.jsonl": len(g["messages"]),
            "preference.jsonl": len(g["preference"]),
            "corpus.txt paragraphs": len(g["corpus"]),
            **{f"benchmarks/{k}.jsonl": len(v) for k, v in g["bench"].items()},
        },
        "dirty": g["dirty"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    return manifest


def run(params: Params, out: str | None = None) -> dict:
    started = time.time()
    cfg = params.make_data
    out = out or cfg.out
    with atomic_path(out) as tmp:
        manifest = write_generated(cfg, tmp)
        write_meta(tmp, stage="make_data", params=cfg, inputs={}, started=started, reproducible=True)
    return {"out": out, "counts": manifest["counts"], "dirty_rows": len(manifest["dirty"]),
            "wall_time_s": round(time.time() - started, 2)}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder, replaced atomically (default: make_data.out)")


def main(argv=None) -> int:
    return stage_main("make_data", run, _args, argv, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
