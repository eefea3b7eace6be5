"""Probes of what a model knows and what it reads: closed-book fact questions over a three-way
split of the world's facts, and cloze items on facts given in context.

`experiments.studies` uses them to measure two of the textbook's claims:

- *Fine-tuning does not teach new facts* (`FactSplit`): the people of a world are split into
  three groups. Group "pretrain" has its facts only in the pre-training corpus, group "sft" only
  in SFT answers (its documents are filtered out of the corpus: `filtered_corpus`), group "both"
  in both (its SFT questions teach the question formats on facts the corpus states). Every fact
  is asked two ways (`QUESTIONS`): SFT asks the "sft" group the first way only, so the second way
  is a held-out question for both the "pretrain" and the "sft" groups.
- *In-context learning appears with scale* (`context_cloze_items`): a context of two to four
  made-up facts about the world's people (values drawn at random, so memory does not help),
  then a cloze ("Mia's kite is") whose answer is in the context; a base model is scored by
  which candidate it gives the highest log-probability.

Nothing here changes what TinyWorld's other generators write: the pipeline's data stay the same.
Every word is in the closed vocabulary (tests/test_studies.py checks).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator

from jaxlm.data.tinyworld import corpus
from jaxlm.data.tinyworld import world as W

GROUPS = ("pretrain", "sft", "both")
# kind: (question asked in SFT, the held-out phrasing, the answer sentence, the answer pool)
QUESTIONS = {
    "colour": ("What colour is {name}'s {obj}?", "Tell me the colour of {name}'s {obj}.",
               "{name}'s {obj} is {value}.", W.COLOURS),
    "food": ("What does {name} like to eat?", "Tell me what {name} likes.", "{name} likes {value}.", W.FOODS),
    "home": ("Where is {name}'s home?", "Tell me where {name} lives.", "{name} lives near the {value}.", W.PLACES),
}
# The corpus's own sentence for each kind, cut before the answer: a base model's cloze.
FACT_CLOZES = {"colour": "{name}'s {obj} is", "food": "{name} likes", "home": "{name} lives near the"}


@dataclasses.dataclass(frozen=True)
class Fact:
    name: str
    kind: str  # a key of QUESTIONS
    value: str  # the answer word
    obj: str = ""  # the thing, for kind "colour"

    def question(self, phrasing: int) -> str:
        """phrasing 0: the form SFT trains on; 1: the held-out form."""
        return QUESTIONS[self.kind][phrasing].format(name=self.name, obj=self.obj)

    @property
    def answer(self) -> str:
        return QUESTIONS[self.kind][2].format(name=self.name, obj=self.obj, value=self.value)

    @property
    def cloze(self) -> str:
        return FACT_CLOZES[self.kind].format(name=self.name, obj=self.obj)

    @property
    def pool(self) -> tuple[str, ...]:
        return QUESTIONS[self.kind][3]


def person_facts(p: W.Person) -> list[Fact]:
    return ([Fact(p.name, "colour", t.colour, t.name) for t in p.things]
            + [Fact(p.name, "food", p.food), Fact(p.name, "home", p.home)])


@dataclasses.dataclass(frozen=True)
class FactSplit:
    """The world's people in GROUPS (a seeded shuffle, as even as the count allows) and their facts."""
    world: W.World
    groups: dict[str, tuple[str, ...]]

    @classmethod
    def make(cls, world: W.World, seed: int) -> FactSplit:
        names = list(world.names)
        random.Random(f"tinyworld/probes/split/{seed}").shuffle(names)
        return cls(world, {g: tuple(names[i::len(GROUPS)]) for i, g in enumerate(GROUPS)})

    def facts(self, group: str) -> list[Fact]:
        return [f for name in self.groups[group] for f in person_facts(self.world.person(name))]

    def reveals_sft_fact(self, doc: str) -> bool:
        """True when `doc` names a person of the "sft" group together with any word of that person's
        facts (their things, the things' colours, food, home): such documents leave the corpus.
        Coarser than the facts themselves, so that no sentence form can leak one."""
        words = {W.bare(w) for w in W.words(doc)}
        for name in self.groups["sft"]:
            if name.lower() in words:
                p = self.world.person(name)
                attributes = {t.name for t in p.things} | {t.colour for t in p.things} | {p.food, p.home}
                if words & attributes:
                    return True
        return False

    def sft_records(self, repeats: int) -> list[dict]:
        """SFT demonstrations {prompt, response, family="facts", group}: the "sft" group asked the
        first way, the "both" group both ways; `repeats` copies each, so the answers are learnt."""
        out = []
        for group, phrasings in (("sft", (0,)), ("both", (0, 1))):
            for f in self.facts(group):
                for k in phrasings:
                    record = {"prompt": f.question(k), "response": f.answer, "family": "facts", "group": group}
                    out += [record] * repeats
        random.Random(f"tinyworld/probes/sft/{len(out)}").shuffle(out)
        return out


def filtered_corpus(split: FactSplit, num_docs: int, seed: int, stream: str = "train") -> Iterator[str]:
    """The first `num_docs` documents of TinyWorld's corpus stream that do not reveal an "sft"-group
    fact: the pipeline's corpus with those documents dropped, topped up from further down the stream."""
    kept = 0
    for doc in corpus.corpus_documents(split.world, 50 * num_docs + 1000, seed, stream=stream):
        if kept == num_docs:
            return
        if not split.reveals_sft_fact(doc):
            kept += 1
            yield doc
    raise RuntimeError(f"only {kept} of {num_docs} corpus documents survive the filter")


def recalled(answer: str, fact: Fact) -> bool:
    """The first word of the fact's answer pool in `answer` is the fact's value."""
    pool = {w.lower() for w in fact.pool}
    first = next((w for w in (W.bare(x) for x in W.words(answer)) if w in pool), None)
    return first == fact.value.lower()


# Cloze items on facts given in context (reading, not memory). kind: (context sentence, cloze, pool)
CONTEXT_CLOZES = {
    "colour": ("{name} has {a_} {value} {obj}.", "{name}'s {obj} is", W.COLOURS),
    "where": ("{name} is in the {value}.", "{name} is in the", W.PLACES),
    "likes": ("{name} likes {value}.", "{name} likes", W.FOODS),
}


@dataclasses.dataclass(frozen=True)
class ClozeItem:
    prefix: str  # context sentences and the cloze, e.g. "Mia has a red kite. Tom has ... Mia's kite is"
    answer: str
    candidates: tuple[str, ...]  # the kind's whole pool, answer included
    in_context: tuple[str, ...]  # the values the context states (copying any of them: 1/len right)


def context_cloze_items(world: W.World, num: int, seed: int) -> list[ClozeItem]:
    """`num` items: 2-4 people, one made-up fact each of one kind with distinct values, the cloze
    asks one of them."""
    rng = random.Random(f"tinyworld/probes/context/{seed}")
    items = []
    for _ in range(num):
        kind = rng.choice(tuple(CONTEXT_CLOZES))
        sentence, cloze, pool = CONTEXT_CLOZES[kind]
        people = rng.sample(world.names, rng.choice((2, 3, 3, 4)))
        values = rng.sample(pool, len(people))
        obj = rng.choice(W.OBJECTS)
        facts = [dict(name=n, value=v, obj=obj, a_=W.article(v)) for n, v in zip(people, values)]
        asked = rng.choice(facts)
        context = " ".join(sentence.format(**f) for f in facts)
        items.append(ClozeItem(f"{context} {cloze.format(**asked)}", asked["value"], tuple(pool), tuple(values)))
    return items


def fact_cloze_items(facts: list[Fact]) -> list[ClozeItem]:
    """A base model's closed-book recall: the corpus's own sentence, cut before the answer."""
    return [ClozeItem(f.cloze, f.value, tuple(f.pool), ()) for f in facts]
