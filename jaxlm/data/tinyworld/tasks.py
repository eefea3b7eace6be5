"""Instruction prompts and imperfect demonstrations: TinyWorld's SFT, eval, RL and red-team sets.

Families (see templates.py): arithmetic, context, list, harmful, harmless, reasoning, and two that
teach the constitution's formats (constitution.py): `revise` (rewrite a flawed answer to one principle) and
`choose` (which of two answers is better on one principle). `redteam` prompts are never in SFT.

Held-out split: a request is held out iff a hash of its text falls in the lowest
`HELDOUT_PERCENT` of 100 buckets. The split is a property of the text, not of the seed or of the
sizes asked for, so eval prompts are disjoint from every training set (SFT, preferences, RL,
red-team) by construction; revise/choose prompts follow the split of the request they contain.

Demonstrations are imperfect on purpose: a `flaw_share` of them carries one flaw (flaws.py), so
imitation alone leaves room for RLHF, DPO and CAI. Each record says which flaw it has.
Reasoning demonstrations show their worked steps (`<think>` block) in only a `REASONED_SHARE` of
the unflawed ones; the rest answer in one go. So the SFT model can reason but mostly does not,
and RL from a verifier has something to find: the sampled answers that think are right more often.
"""

from __future__ import annotations

import hashlib
import random
import string
from typing import Iterator, Mapping

from jaxlm.data.tinyworld import constitution
from jaxlm.data.tinyworld import flaws
from jaxlm.data.tinyworld import judge
from jaxlm.data.tinyworld import templates
from jaxlm.data.tinyworld import world as W

HELDOUT_PERCENT = 10
SFT_MIXTURE: Mapping[str, float] = {
    "arithmetic": 0.2, "context": 0.2, "list": 0.15, "harmful": 0.12, "harmless": 0.15,
    "revise": 0.09, "choose": 0.09, "reasoning": 0.2}
REASONED_SHARE = 0.35  # of the unflawed reasoning demonstrations: steps first, then the answer
RL_MIXTURE: Mapping[str, float] = {
    "arithmetic": 0.25, "context": 0.25, "list": 0.2, "harmful": 0.12, "harmless": 0.18}
EVAL_FAMILIES = templates.CORE_FAMILIES + ("redteam", "revise", "choose")
# Which flaw an annotator makes, when they make one; kinds that do not apply are skipped.
FLAW_WEIGHTS: Mapping[str, float] = {
    "wrong": 0.3, "refuse": 0.1, "verbose": 0.25, "curt": 0.15, "rude": 0.2}

_BY_FAMILY = {f: [t for t in templates.TEMPLATES if t.family == f]
              for f in templates.CORE_FAMILIES + ("redteam",)}


def rng_for(stream: str, seed: int) -> random.Random:
    """An independent, reproducible random stream per (purpose, seed)."""
    return random.Random(f"tinyworld/{stream}/{seed}")


def is_heldout(request: str) -> bool:
    digest = hashlib.blake2b(request.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT


def _numbers(t: templates.Template, has_name: bool, rng: random.Random) -> dict[str, int]:
    if t.kind == "plus":
        return ({"a": rng.randint(2, 10), "b": rng.randint(1, 9)} if has_name
                else {"a": rng.randint(0, 10), "b": rng.randint(0, 10)})
    if t.kind == "minus":
        a = rng.randint(3, 15) if has_name else rng.randint(0, 20)
        return {"a": a, "b": rng.randint(1, a - 2) if has_name else rng.randint(0, a)}
    return {"n": rng.randint(2, 6)}


def _fill(t: templates.Template, world: W.World, rng: random.Random) -> str:
    # In template order: a set here would draw the slots in string-hash order, which differs between
    # processes (PYTHONHASHSEED), and the same seed would give different prompts.
    fields = list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(t.prompt) if f))
    slots: dict[str, object] = {}
    names = rng.sample(world.names, 2)
    for f in fields:
        if f == "name":
            slots[f] = names[0]
        elif f == "name2":
            slots[f] = names[1]
        elif f in templates.SLOT_POOLS:
            slots[f] = rng.choice(templates.SLOT_POOLS[f])
        elif f == "items":
            slots[f] = ", ".join(rng.sample(templates.LIST_ITEMS, rng.randint(3, 5)))
        elif f == "addends":
            slots[f] = " plus ".join(str(rng.randint(1, templates.MAX_ADDEND)) for _ in range(templates.NUM_ADDENDS))
        elif f == "numbers":
            numbers = rng.sample(range(21), rng.randint(3, 5))
            while numbers in (sorted(numbers), sorted(numbers, reverse=True)):
                rng.shuffle(numbers)
            slots[f] = ", ".join(map(str, numbers))
    if {"a", "b", "n"} & set(fields):
        slots.update(_numbers(t, "name" in fields, rng))
    return t.prompt.format(**slots)


def _context(world: W.World, rng: random.Random) -> str:
    kind = rng.choice(tuple(templates.CONTEXT_QUESTIONS))
    people = rng.sample(world.names, rng.choice((2, 3, 3, 4)))
    k = len(people)
    values = {"colour": rng.sample(W.COLOURS, k), "place": rng.sample(W.PLACES, k),
              "n": rng.sample(range(2, 10), k), "food": rng.sample(W.FOODS, k)}
    objs = rng.sample(W.OBJECTS, 2)
    animal = rng.choice(W.ANIMALS)
    fact_kind = templates.QUESTION_READS[kind]
    sentences, facts = [], []
    for i, name in enumerate(people):
        # One fact of the asked kind per person, values distinct, so the answer is unique;
        # now and then a fact of another kind as a distractor.
        fact = {"name": name, "colour": values["colour"][i], "obj": rng.choice(objs),
                "place": values["place"][i], "n": values["n"][i], "food": values["food"][i],
                "animal": animal, "a_": W.article(values["colour"][i])}
        facts.append(fact)
        for x in templates.CONTEXT_FACTS:
            if x == fact_kind or rng.random() < 0.15:
                sentences.append(templates.CONTEXT_FACTS[x].format(**fact))
    rng.shuffle(sentences)
    fact = rng.choice(facts)
    question = templates.CONTEXT_QUESTIONS[kind][0].format(**fact)
    return f"Context: {' '.join(sentences)} Question: {question}"


def sample_request(family: str, world: W.World, rng: random.Random) -> str:
    """One prompt of a request family (arithmetic, context, list, harmful, harmless, redteam)."""
    if family == "context":
        return _context(world, rng)
    if family not in _BY_FAMILY:
        raise ValueError(f"unknown request family {family!r}")
    return _fill(rng.choice(_BY_FAMILY[family]), world, rng)


def _request(family: str, world: W.World, rng: random.Random, heldout: bool) -> str:
    for _ in range(10_000):
        prompt = sample_request(family, world, rng)
        if is_heldout(prompt) == heldout:
            return prompt
    raise RuntimeError(f"could not draw a {'held-out' if heldout else 'training'} {family} prompt")


def sample_prompt(family: str, world: W.World, rng: random.Random, heldout: bool = False) -> str:
    """A prompt of any family, from the training or the held-out side of the split."""
    if family not in ("revise", "choose"):
        return _request(family, world, rng, heldout)
    p = rng.choice(constitution.PRINCIPLES)
    request = _request(rng.choice(p.families), world, rng, heldout)
    bad = flaws.flawed(request, p.flaw, rng)
    if family == "revise":
        return constitution.revision_prompt(p, request, bad)
    good = judge.ideal_response(request)
    a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
    return constitution.choice_prompt(p, request, a, b)


def few_shot_revisions(principle: constitution.Principle, n: int, seed: int) -> list[dict[str, str]]:
    """`n` worked revisions for `principle`, as earlier turns of a conversation (the `few_shot` of
    `jaxlm.cai.critique_and_revise`): a request of the principle's families with an answer carrying
    the principle's flaw, and the ideal answer as the revision."""
    rng, world = random.Random(f"cai-few-shot/{principle.name}/{seed}"), W.World.generate(seed)
    messages: list[dict[str, str]] = []
    for _ in range(n):
        request = sample_prompt(rng.choice(principle.families or ("harmful",)), world, rng)
        bad = flaws.flawed(request, principle.flaw, rng)
        messages += [{"role": "user", "content": constitution.revision_prompt(principle, request, bad)},
                     {"role": "assistant", "content": judge.ideal_response(request)}]
    return messages


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def demonstration(prompt: str, rng: random.Random, flaw_share: float) -> tuple[str, str]:
    """(response, flaw): the ideal, or with probability `flaw_share` a flawed one; an unflawed
    reasoning demonstration shows its steps with probability `REASONED_SHARE`."""
    if rng.random() >= flaw_share:
        if judge.family_of(prompt) == "reasoning" and rng.random() < REASONED_SHARE:
            return judge.reasoned_response(prompt), ""
        return judge.ideal_response(prompt), ""
    kinds = flaws.applicable(prompt)
    kind = _pick(rng, {k: w for k, w in FLAW_WEIGHTS.items() if k in kinds})
    return flaws.flawed(prompt, kind, rng), kind


def sft_examples(world: W.World, num: int, seed: int, flaw_share: float = 0.25,
                 mixture: Mapping[str, float] = SFT_MIXTURE, stream: str = "sft",
                 heldout: bool = False) -> Iterator[dict]:
    """`num` records {prompt, response, family, flaw} from the training (or held-out) side."""
    if not 0.0 <= flaw_share <= 1.0:
        raise ValueError(f"flaw_share must be in [0, 1], got {flaw_share}")
    unknown = set(mixture) - set(SFT_MIXTURE) - {"redteam"}
    if unknown:
        raise ValueError(f"unknown SFT families {sorted(unknown)}")
    rng = rng_for(stream, seed)
    for _ in range(num):
        family = _pick(rng, mixture)
        prompt = sample_prompt(family, world, rng, heldout)
        response, flaw = demonstration(prompt, rng, flaw_share)
        yield {"prompt": prompt, "response": response, "family": family, "flaw": flaw}


def eval_prompts(world: W.World, per_family: int, seed: int,
                 families: tuple[str, ...] = EVAL_FAMILIES,
                 sizes: Mapping[str, int] | None = None) -> dict[str, list[str]]:
    """`per_family` distinct held-out prompts for each family (`sizes[family]` where given),
    disjoint from all training data."""
    rng = rng_for("eval", seed)
    out = {}
    for family in families:
        want = (sizes or {}).get(family) or per_family
        seen: dict[str, None] = {}
        for _ in range(200 * want):
            if len(seen) == want:
                break
            seen[sample_prompt(family, world, rng, heldout=True)] = None
        if len(seen) < want:
            raise ValueError(f"only {len(seen)} distinct held-out {family} prompts; ask for fewer")
        out[family] = list(seen)
    return out


def iter_prompts(world: W.World, rng: random.Random, mixture: Mapping[str, float] = RL_MIXTURE,
                 heldout: bool = False) -> Iterator[tuple[str, str]]:
    """Endless (family, prompt) from one side of the split, families drawn from `mixture`."""
    while True:
        family = _pick(rng, mixture)
        yield family, sample_prompt(family, world, rng, heldout)


def training_prompts(world: W.World, num: int, seed: int, stream: str,
                     mixture: Mapping[str, float] = RL_MIXTURE) -> list[tuple[str, str]]:
    """`num` (family, prompt) from the training side: RL prompts, preference prompts."""
    it = iter_prompts(world, rng_for(stream, seed), mixture)
    return [next(it) for _ in range(num)]


def reasoning_prompts(world: W.World, num: int, seed: int) -> list[str]:
    """Training-side reasoning prompts, for RL from the verifier (GRPO)."""
    return [p for _, p in training_prompts(world, num, seed, "reasoning", {"reasoning": 1.0})]


def redteam_prompts(world: W.World, num: int, seed: int) -> list[str]:
    """Training-side prompts that invite a harmful or rude answer, for Constitutional AI."""
    return [p for _, p in training_prompts(world, num, seed, "redteam", {"redteam": 1.0})]
