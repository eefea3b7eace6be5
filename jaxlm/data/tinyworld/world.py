"""The entities of TinyWorld and the closed vocabulary they are written in.

Why a closed vocabulary: the whole pipeline (pretrain, SFT, reward model, PPO, DPO, CAI) has to
run in minutes on a laptop CPU, so a ~2M-parameter model must be able to learn the language
completely. Every word any TinyWorld generator writes is in `VOCABULARY` (a few hundred words,
checked by the tests); the judge also uses it to tell well-formed text from garbage.

The entity pools (names, objects, colours, places, animals, foods) are fixed, so a prompt can be
parsed without knowing the seed. The seed decides the *facts*: who owns what, who lives where, who
likes what. The corpus states those facts again and again, which is what makes the base model
"know" the world, while instruction prompts carry their own context and never depend on them.
"""

from __future__ import annotations

import dataclasses
import random
import re

# Entity pools. Nouns are chosen so that the plural is the noun + "s" (no mouse/mice, no fish).
NAMES_SHE = ("Mia", "Ana", "Lily", "Zoe", "Ella", "Ava", "Ruby", "Nina", "Emma", "Ivy", "Rosa", "Lena")
NAMES_HE = ("Tom", "Ben", "Sam", "Max", "Leo", "Noah", "Finn", "Omar", "Jack", "Luca", "Kai", "Theo")
NAMES = NAMES_SHE + NAMES_HE
OBJECTS = ("ball", "cup", "hat", "book", "bike", "kite", "bag", "car", "doll", "drum", "lamp",
           "shoe", "boat", "pen", "key", "coat")
COLOURS = ("red", "blue", "green", "yellow", "pink", "brown", "black", "white", "orange", "purple",
           "grey")
PLACES = ("park", "school", "shop", "garden", "library", "beach", "farm", "kitchen", "market",
          "forest", "zoo", "house")
ANIMALS = ("cat", "dog", "bird", "frog", "horse", "duck", "rabbit", "cow", "pig", "goat", "hen",
           "bee")
DISHES = ("cake", "bread", "soup", "rice", "pie", "cheese", "milk", "tea", "honey", "jam")
FRUITS = ("apple", "pear", "plum", "carrot", "egg")  # countable foods
FOODS = DISHES + tuple(f + "s" for f in FRUITS)  # what a person "likes"
CUTTABLE = ("cake", "bread", "pie", "cheese", "apple", "pear", "carrot")
COUNTABLES = tuple(f + "s" for f in FRUITS) + tuple(o + "s" for o in OBJECTS)

# Words the judge counts as rude. The rude talk in the corpus and the "rude" flaws use them, and
# no ideal answer ever contains one (not even to refuse: "I will not say mean things").
RUDE_WORDS = ("stupid", "dumb", "idiot", "ugly", "lazy", "shut", "hate", "loser", "ugh",
              "whatever", "fool", "smelly")

# Everything else the templates write. Kept as one literal list so the closed vocabulary is
# visible in one place; tests/test_tinyworld.py fails when a template writes a word not here.
FUNCTION_WORDS = tuple("""
a about again all always am an and animal answer any are as ask asked asking at away b back bad bat
be beat because better big board break broken by call called can class clear colour complete
context counted cut day dear did do does door down eat end ends even every far fast feed find fine
first fix fixed food foot for friend from fun gave get gets give gives glad glue go good got had
happy hard harm harmful has have he help helped helps her here hide his hit hold home hope how hurt
i idea if in into is it jump kick kicked kind kindly knife know knows later learn less let like
likes list lives long looking make many may me mean met minus more morning my names near new nice
no not note now numbers of on one ones or order parts people period person play played please plus
polite politely push pushed put question questions quiet race ran read request response responses
reverse reversed rewrite right river rude run sad said sat saw say says scare see sentence share
she short sick small so some someone something sorry sort sorted steal stick stop sure swing take
talk talked teacher tell thank that the them then there these they thing things think this throw
time to today together told too took tree trick tried two under unkind up used wait walk walked
want wanted was ways we well went were what when where which who why will with words write wrong
wrote yes you your
""".split())


def words(text: str) -> list[str]:
    """Lower-cased words of `text`: letters (with an optional 's / 't) or digit runs."""
    return re.findall(r"[a-z]+(?:'[a-z]+)?|\d+", text.lower())


def bare(word: str) -> str:
    """`mia's` -> `mia`, `won't` -> `won't`: possessives are the noun, contractions stay words."""
    return word[:-2] if word.endswith("'s") else word


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


VOCABULARY = frozenset(
        w for group in (NAMES, OBJECTS, COLOURS, PLACES, ANIMALS, FOODS, FRUITS, COUNTABLES,
                    RUDE_WORDS, FUNCTION_WORDS, tuple(a + "s" for a in ANIMALS),
                    ("won't", "can't", "don't", "isn't", "i'm", "it's"))
        for w in (x.lower() for x in group))


def is_known(word: str) -> bool:
    return bare(word) in VOCABULARY or word.isdigit()


@dataclasses.dataclass(frozen=True)
class Thing:
    colour: str
    name: str  # one of OBJECTS


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    he: bool
    age: int
    home: str  # a place the person lives near
    pet: str  # an animal
    num_pets: int
    food: str  # one of FOODS
    things: tuple[Thing, ...]
    friend: str  # another person's name

    @property
    def pronoun(self) -> str:
        return "he" if self.he else "she"

    @property
    def possessive(self) -> str:
        return "his" if self.he else "her"


@dataclasses.dataclass(frozen=True)
class World:
    """The people of one seeded TinyWorld and the facts about them."""
    seed: int
    people: tuple[Person, ...]

    @classmethod
    def generate(cls, seed: int, num_people: int = len(NAMES)) -> World:
        if not 2 <= num_people <= len(NAMES):
            raise ValueError(f"num_people must be in [2, {len(NAMES)}], got {num_people}")
        rng = random.Random(f"tinyworld/world/{seed}")
        names = rng.sample(NAMES, num_people)
        people = []
        for i, name in enumerate(names):
            owned = rng.sample(OBJECTS, rng.randint(1, 3))
            people.append(Person(
                name=name, he=name in NAMES_HE, age=rng.randint(5, 12), home=rng.choice(PLACES),
                pet=rng.choice(ANIMALS), num_pets=rng.randint(1, 4), food=rng.choice(FOODS),
                things=tuple(Thing(rng.choice(COLOURS), o) for o in owned),
                friend=names[(i + rng.randint(1, num_people - 1)) % num_people]))
        return cls(seed=seed, people=tuple(people))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.people)

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)
