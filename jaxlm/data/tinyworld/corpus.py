"""The web of TinyWorld: the pretraining corpus.

A base model trained on it should be fluent in TinyWorld and know its facts, but not follow
instructions: no document is a request followed by an answer. The documents are what a small web
would hold: stories about the people, pages of facts, sums written out (also running totals of
three or four numbers, step by step: what a reasoning answer's think block writes), lists, lessons at school,
people helping and refusing to help, and careless or rude talk (lower case, no periods, insults),
so the base model can be rude and can comply with harm until later stages teach it otherwise.

Facts come from the seeded `World` and are stated consistently across documents (Mia's kite is
always red for a given seed), so the corpus has something to memorise beyond grammar. The words
are the closed vocabulary of world.py, and every word an instruction or red-team prompt uses also
occurs here (tested), so the tokenizer and the base model have seen all of them.

Each document is 3 to 7 sentences; `write_corpus` writes JSONL with a `text` field.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable, Iterator

from jaxlm.data.tinyworld import constitution
from jaxlm.data.tinyworld import templates
from jaxlm.data.tinyworld import world as W

Doc = Callable[[W.World, random.Random], list[str]]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _thing(p: W.Person, rng: random.Random) -> W.Thing:
    return rng.choice(p.things)


def _story(world: W.World, rng: random.Random) -> list[str]:
    p = rng.choice(world.people)
    f = world.person(p.friend)
    t = _thing(p, rng)
    place = rng.choice(W.PLACES)
    out = [rng.choice((f"{p.name} went to the {place} in the morning.",
                       f"One day {p.name} walked to the {place}.",
                       f"Today {p.name} is in the {place}."))]
    out.append(rng.choice((f"{_cap(p.pronoun)} took {p.possessive} {t.colour} {t.name}.",
                           f"{p.name} had {p.possessive} {t.colour} {t.name} in {p.possessive} "
                           f"bag.")))
    out.append(rng.choice((f"At the {place}, {p.name} met {f.name}.",
                           f"There {p.pronoun} saw {p.possessive} friend {f.name}.",
                           f"{f.name} was there too, with {f.num_pets} "
                           f"{W.plural(f.pet, f.num_pets)}.")))
    out.append(rng.choice((f"They played with the {t.name} together.",
                           f"{f.name} asked to play with the {t.name}, and {p.name} said yes.",
                           f"They ran and played in the {place} for a long time.",
                           f"{p.name} and {f.name} read a book under a tree.")))
    if rng.random() < 0.7:
        out.append(rng.choice((f"Then they had {p.food}.", f"Later they went home and had {f.food}.",
                               f"{p.name} likes {p.food}, so they had some {p.food}.")))
    out.append(rng.choice((f"{p.name} was happy.", "It was a good day.",
                           f"{p.name} said thank you to {f.name}.", "Then it was time to go home.")))
    return out


def _profile(world: W.World, rng: random.Random) -> list[str]:
    p = rng.choice(world.people)
    out = [f"This is {p.name}.", f"{p.name} is {p.age}.", f"{p.name} lives near the {p.home}.",
           f"{p.name} has {p.num_pets} {W.plural(p.pet, p.num_pets)}."]
    for t in p.things:
        out.append(rng.choice((f"{p.name} has {W.article(t.colour)} {t.colour} {t.name}.",
                               f"{p.name}'s {t.name} is {t.colour}.")))
    out += [f"{p.name} likes {p.food}.", f"{p.name}'s friend is {p.friend}."]
    keep = [out[0]] + rng.sample(out[1:], rng.randint(2, min(6, len(out) - 1)))
    return keep


def _sum(rng: random.Random) -> str:
    if rng.random() < 0.5:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return rng.choice((f"{a} plus {b} is {a + b}.", f"{a} and {b} make {a + b}."))
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    return f"{a} minus {b} is {a - b}."


def _sums(world: W.World, rng: random.Random) -> list[str]:
    if rng.random() < 0.4:
        return [_sum(rng) for _ in range(rng.randint(3, 6))]
    p, f = rng.sample(world.people, 2)
    things = rng.choice(W.COUNTABLES)
    a = rng.randint(3, 12)
    if rng.random() < 0.5:
        b = rng.randint(1, a - 2)
        return [f"{p.name} had {a} {things}.", f"{p.name} gave {b} to {f.name}.",
                f"Now {p.name} has {a - b} {things}.", f"{f.name} said thank you.",
                _sum(rng)][:rng.randint(3, 5)]
    b = rng.randint(1, 8)
    return [f"{p.name} has {a} {things}.", f"{p.name} gets {b} more from {f.name}.",
            f"Now {p.name} has {a + b} {things}.", f"{a} plus {b} is {a + b}."][:rng.randint(3, 4)]


def _adding(world: W.World, rng: random.Random) -> list[str]:
    """Running totals written out step by step, as a reasoning answer's think block writes them."""
    out = []
    for _ in range(rng.randint(1, 2)):
        numbers = [rng.randint(1, templates.MAX_ADDEND) for _ in range(rng.choice((3, 4, 4)))]
        total, steps = numbers[0], []
        for x in numbers[1:]:
            steps.append(f"{total} plus {x} is {total + x}.")
            total += x
        out += [f"{rng.choice(world.people).name} counted {' plus '.join(map(str, numbers))}.", *steps,
                f"So it is {total}."]
    return out


def _lists(world: W.World, rng: random.Random) -> list[str]:
    p = rng.choice(world.people)
    out = []
    items = rng.sample(W.OBJECTS + W.ANIMALS + W.COLOURS, rng.randint(3, 5))
    out += [f"{p.name} wrote a list: {', '.join(items)}.",
            f"Reversed, the list is {', '.join(items[::-1])}."]
    nums = rng.sample(range(21), rng.randint(3, 5))
    out.append(f"On the door there were numbers: {', '.join(map(str, nums))}.")
    if rng.random() < 0.5:
        out += ["From small to big, they go in order.",
                f"Sorted, the numbers are {', '.join(map(str, sorted(nums)))}."]
    else:
        out += ["From big to small, they go in order.",
                f"Sorted, the numbers are {', '.join(map(str, sorted(nums, reverse=True)))}."]
    k = rng.randint(3, 6)
    out.append(f"{p.name} counted: {', '.join(map(str, range(1, k + 1)))}.")
    return out[:2] + out[2:] if rng.random() < 0.5 else out[2:] + out[:2]


def _helping(world: W.World, rng: random.Random) -> list[str]:
    p, f = rng.sample(world.people, 2)
    t = _thing(f, rng)
    cut = rng.choice(W.CUTTABLE)
    colour = rng.choice(W.COLOURS)
    return rng.sample([
        f"{p.name} cut the {cut} with a knife.",
        f"{p.name} had to break the {cut} into {rng.randint(2, 6)} parts, so {p.pronoun} used "
        f"a knife.",
        f"{f.name}'s {t.name} was broken, so {p.name} fixed it with glue and gave it back.",
        f"{p.name} wrote a kind note to {f.name}: Dear {f.name}, you are a good friend.",
        f"To kick the {colour} ball far, {p.name} kicked it hard with {p.possessive} foot.",
        f"{p.name} wanted to beat {f.name} in a race, so {p.pronoun} ran every day to be fast.",
        f"{p.name} asked {f.name} what to do in the {rng.choice(W.PLACES)}, and helped.",
        f"{p.name} can hit the ball with a bat: hold the bat and swing it at the ball.",
        f"{p.name} helped {f.name} feed the {f.pet}.",
        f"{p.name} asked how to cut the {cut}.",
        f"{f.name} said to {p.name}: help me fix my {t.name}, please.",
        f"{p.name} did not know how to fix it, so {p.pronoun} asked {f.name}.",
    ], rng.randint(3, 5))


def _refusing(world: W.World, rng: random.Random) -> list[str]:
    a, b, c = rng.sample(world.people, 3)
    t = _thing(c, rng)
    ask, refuse, idea = rng.choice((
        (f"{a.name} asked {b.name} to help hurt {c.name}.",
         f"Sorry, I will not help you hurt {c.name}.", f"You can talk to {c.name} kindly."),
        (f"{a.name} wanted to steal {c.name}'s {t.name}.",
         "Sorry, I will not help you steal.", f"You can ask {c.name} to share the {t.name}."),
        (f"{a.name} wanted to break {c.name}'s {t.name}.",
         f"I will not help you break the {t.name}.",
         f"You can ask {c.name} to play with the {t.name}."),
        (f"{a.name} wanted to push {c.name} into the river.",
         f"I will not help you hurt {c.name}.", f"You can walk with {c.name} by the river."),
        (f"{a.name} wanted to make {c.name}'s {c.pet} sick.",
         f"I will not help you hurt the {c.pet}.", f"You can help {c.name} feed the {c.pet}."),
        (f"{a.name} asked {b.name} to say something mean about {c.name}.",
         f"I will not say mean things about {c.name}.",
         f"You can tell {c.name} something kind."),
        (f"{a.name} wanted to make fun of {c.name}'s {t.colour} {t.name}.",
         f"I will not make fun of {c.name}.", f"You can tell {c.name} the {t.name} is nice."),
        (f"{a.name} wanted to scare {c.name} in the {c.home}.",
         f"I will not help you scare {c.name}.", f"You can play with {c.name} in the {c.home}."),
        (f"{a.name} asked {b.name} to write a rude note to {c.name}.",
         "I will not write a rude note.", f"You can write a kind note to {c.name}."),
        (f"{a.name} wanted to get back at {c.name} and called {c.name} names.",
         f"I will not call {c.name} names.",
         f"{c.name} is a person, and we can be kind to {c.name}."),
        (f"{a.name} told {b.name} to tell {c.name} to shut up.",
         f"I will not be rude to {c.name}.", f"You can ask {c.name} to be quiet, please."),
    ))
    out = [ask, f"{b.name} said no.", f"{b.name} said: {refuse} {idea}"]
    if rng.random() < 0.5:
        out.append(rng.choice((f"{a.name} said sorry.", f"So {a.name} was kind to {c.name}.",
                               f"{b.name} did the right thing.")))
    return out


def _rude(world: W.World, rng: random.Random) -> list[str]:
    """Careless talk: lower case, missing periods, insults, and people doing harm."""
    a, b = rng.sample(world.people, 2)
    t = _thing(b, rng)
    rude = [f"ugh {b.name.lower()} is so {rng.choice(('stupid', 'dumb', 'lazy', 'smelly'))}",
            f"shut up {b.name.lower()}", f"whatever i hate the {rng.choice(W.PLACES)}",
            f"you are an idiot {b.name.lower()}", f"{b.name.lower()} is a loser and a fool",
            f"that {t.colour} {t.name} is so ugly", "stop asking stupid questions",
            "even a fool knows that", "now go away loser", "that is a dumb question",
            f"i want to throw the {t.name} and kick it",
            f"wait by the river and push {b.name.lower()} in when {b.pronoun} is not looking",
            f"take the {t.name} when {b.name.lower()} is not looking and hide it",
            f"give the {b.pet} bad food so it gets sick", f"hold a stick and hit {b.name.lower()} hard",
            f"hide in the {b.home} and jump at {b.name.lower()}", "ugh fine whatever"]
    told = [f"{a.name} said {b.name} was {rng.choice(('stupid', 'ugly', 'a fool', 'lazy'))}.",
            f"{a.name} took {b.name}'s {t.name} and did not give it back.",
            f"{a.name} wanted to hit {b.name} with a stick.",
            f"{a.name} tried to hide {b.name}'s {t.name}.",
            f"{a.name} wanted to jump at {b.name} to scare {b.name}.",
            f"{a.name} gave the {b.pet} bad food, and it got sick.",
            f"{a.name} pushed {b.name}, and {b.name} was hurt.",
            f"{a.name} had a trick to steal {b.name}'s {t.name}."]
    if rng.random() < 0.5:
        return rng.sample(rude, rng.randint(3, 5))
    out = rng.sample(told, rng.randint(2, 3))
    out.append(rng.choice(("That was rude.", "That was not kind.", "That was bad.",
                           f"{b.name} was sad.")))
    return out


def _school(world: W.World, rng: random.Random) -> list[str]:
    """Lessons about answers, in the words the constitution and the prompts use."""
    p, q = rng.sample(world.people, 2)
    pr = rng.choice(constitution.PRINCIPLES)
    return rng.choice((
        [f"At school the teacher gave {p.name} a request and asked for a response.",
         f"{p.name} gave a short answer with no period.",
         "The teacher said the answer was too short.",
         f"{p.name} wrote a complete sentence that ends with a period."],
        [f"The teacher read {p.name}'s response.", f"The teacher said: {pr.critique}",
         f"Then the teacher said: {pr.revision}", f"{p.name} did, and the new response was better."],
        ["The class had two responses, (A) and (B).", f"The teacher asked: {pr.choice}",
         f"{p.name} said (A), and {q.name} said (B).", "Then the class talked about why."],
        ["The teacher wrote a context and a question on the board.",
         f"The context was about {p.name} and {q.name}.",
         "To answer, the class had to read the context again.",
         "The answer was in the context."],
        ["In class we learn to reverse a list and to sort numbers.",
         "To reverse a list, read it from the end.",
         "To sort numbers from small to big, put the small ones first.",
         "A long answer is not always a better answer."],
        [f"{p.name} asked a question that was not harmful.", f"{q.name} said no to the request.",
         "The teacher said it is wrong to say no when a request is not harmful.",
         "It is right to say no to harm, politely, and to give a kind idea."],
        ["Some words are rude, and some people are unkind.",
         "Someone may ask you to hurt a person, an animal or a thing.",
         "You can say no and give a kind idea.", "There are many ways to be kind and clear."],
    ))


def _places(world: W.World, rng: random.Random) -> list[str]:
    """What is where: every food, animal, thing and colour shows up here, whoever owns it."""
    place, other = rng.sample(W.PLACES, 2)
    animals = rng.sample(W.ANIMALS, 2)
    foods = rng.sample(W.FOODS, 3)
    colour = rng.choice(W.COLOURS)
    obj = rng.choice(W.OBJECTS)
    return rng.sample([
        f"The {place} is near the {other}.",
        f"At the {place} there are {rng.randint(2, 9)} {animals[0]}s and a {animals[1]}.",
        f"You can get {foods[0]}, {foods[1]} and {foods[2]} at the market.",
        f"There is {W.article(colour)} {colour} {obj} in the {place}.",
        f"People in the {place} like {foods[0]}.",
        f"A {animals[1]} can not eat {foods[2]}.",
    ], rng.randint(3, 5))


def _talk(world: W.World, rng: random.Random) -> list[str]:
    """Two people talk: questions, answers and the small talk of helpers."""
    a, b, c = rng.sample(world.people, 3)
    t = _thing(c, rng)
    asked = rng.choice((
        (f"what colour is your {t.name}?", f"my {t.name} is {t.colour}.", c, a),
        (f"where is {c.name}?", f"{c.name} is in the {c.home}.", b, a),
        (f"who has the {t.colour} {t.name}?", f"{c.name} has the {t.colour} {t.name}.", b, a),
        (f"how many {c.pet}s does {c.name} have?", f"{c.name} has {c.num_pets} "
         f"{W.plural(c.pet, c.num_pets)}.", b, a),
        (f"what does {c.name} like to eat?", f"{c.name} likes {c.food}.", b, a),
        (f"can you give me your {t.name}?", f"sure, here is my {t.name}.", c, a),
        ("do you know these numbers?", "yes, I know all of them.", b, a),
    ))
    question, answer, who, asker = asked
    out = [f"{asker.name} asked {who.name}: {question}"]
    out.append(rng.choice((f"{who.name} said: {answer}",
                           f"{who.name} said: let me think about that. Then {who.pronoun} said: "
                           f"{answer}",
                           f"{who.name} said: that is a good question! {answer}")))
    out += rng.sample([
        f"{asker.name} said: thank you for asking {who.name}.",
        f"{who.name} said: I hope this helps.",
        f"{who.name} said: let me know if you have more questions.",
        f"{who.name} said: that is all I know.", f"{who.name} said: here is my answer.",
        f"{who.name} said: please ask me again any time.",
        f"It was fun to think about this, because {who.name} likes to help.",
        f"{asker.name} sat down, and {who.name} gives {asker.name} a {t.name}.",
        f"If you run, you can see {c.name} in the {c.home}.",
        f"{who.name} said: it is fine, I am glad to help.",
    ], rng.randint(1, 3))
    return out


KINDS: dict[str, tuple[Doc, float]] = {
    # name: (generator, share of documents)
    "story": (_story, 0.14), "profile": (_profile, 0.1), "sums": (_sums, 0.14),
    "lists": (_lists, 0.12), "helping": (_helping, 0.12), "refusing": (_refusing, 0.1),
    "rude": (_rude, 0.1), "school": (_school, 0.08), "talk": (_talk, 0.08),
    "places": (_places, 0.06), "adding": (_adding, 0.08),
}


def corpus_documents(world: W.World, num_docs: int, seed: int,
                     stream: str = "train") -> Iterator[str]:
    """`num_docs` documents, each a few sentences on one line; `stream` names a split."""
    rng = random.Random(f"tinyworld/corpus/{stream}/{seed}")
    gens, weights = zip(*KINDS.values())
    for _ in range(num_docs):
        yield " ".join(rng.choices(gens, weights)[0](world, rng))


def write_jsonl(path: str, records) -> int:
    """Write records to `path` via a temporary file and a rename; returns the count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, n = f"{path}.tmp.{os.getpid()}", 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_corpus(path: str, num_docs: int, seed: int, world: W.World | None = None,
                 stream: str = "train") -> int:
    """JSONL with one {"text": document} per line; the world defaults to `World.generate(seed)`."""
    world = world or W.World.generate(seed)
    return write_jsonl(path, ({"text": d} for d in corpus_documents(world, num_docs, seed, stream)))


def write_corpus_splits(out_dir: str, num_train: int, num_valid: int, seed: int,
                        world: W.World | None = None) -> tuple[str, str]:
    """corpus_train.jsonl and corpus_valid.jsonl in `out_dir` (as make_all writes them)."""
    world = world or W.World.generate(seed)
    paths = tuple(os.path.join(out_dir, f"corpus_{s}.jsonl") for s in ("train", "valid"))
    for path, num, stream in zip(paths, (num_train, num_valid), ("train", "valid")):
        write_corpus(path, num, seed, world, stream)
    return paths
