"""Preference pairs labelled by simulated raters: Bradley-Terry noise on the gold judge's scores.

A rater shown responses A and B prefers A with probability

    P(A > B) = sigmoid((score_A - score_B) / temperature)

so the labels are noisy in a known way. Even a reward model that knew the gold score exactly
agrees with a sampled label only with probability sigmoid(|Δ| / temperature): averaged over the
pairs that is the Bayes accuracy, the ceiling for held-out reward-model accuracy, reported with
the data (and checked against the empirical agreement in the tests). Lower temperature means
cleaner labels; temperature -> 0 gives the gold order.

Each record is TRL-style {prompt, chosen, rejected} plus `label`, the BT probability that
`chosen` is preferred (a soft label; below 0.5 when the noise flipped the pair), the two gold
scores for audit, and the family. Pairs of equal gold score carry no signal and are not made.

Responses come from a list of model samples when given (`pairs_from_samples`, for online or
iterated preference collection) or else from flawed variants of the ideal answer
(`pairs_from_perturbations`), so the data exists before any model does.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Iterable, Mapping, Sequence

from jaxlm.data.tinyworld import flaws
from jaxlm.data.tinyworld import judge
from jaxlm.data.tinyworld import tasks
from jaxlm.data.tinyworld import world as W

DEFAULT_TEMPERATURE = 0.2  # Bayes accuracy ~0.86 on the default mix: visible, learnable noise
_MIN_GAP = 1e-6  # gold scores closer than this are a tie


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def bt_probability(score_a: float, score_b: float, temperature: float) -> float:
    """P(A preferred over B) under Bradley-Terry noise with this temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return sigmoid((score_a - score_b) / temperature)


def label_pair(prompt: str, a: str, b: str, rng: random.Random, temperature: float,
               scores: tuple[float, float] | None = None) -> dict | None:
    """One simulated rater's choice between `a` and `b`; None when their gold scores tie."""
    sa, sb = scores or (judge.score(prompt, a).total, judge.score(prompt, b).total)
    if abs(sa - sb) < _MIN_GAP:
        return None
    p_a = bt_probability(sa, sb, temperature)
    a_wins = rng.random() < p_a
    chosen, rejected = (a, b) if a_wins else (b, a)
    s_c, s_r = (sa, sb) if a_wins else (sb, sa)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "label": p_a if a_wins else 1.0 - p_a,
            "chosen_score": s_c, "rejected_score": s_r, "family": judge.family_of(prompt)}


def pairs_from_samples(prompt: str, responses: Sequence[str], rng: random.Random,
                       temperature: float = DEFAULT_TEMPERATURE,
                       max_pairs: int | None = None) -> list[dict]:
    """Labelled pairs among distinct responses (e.g. model samples) with different gold scores."""
    distinct = list(dict.fromkeys(responses))
    scores = {r: judge.score(prompt, r).total for r in distinct}
    candidates = [(a, b) for a, b in itertools.combinations(distinct, 2)
                  if abs(scores[a] - scores[b]) >= _MIN_GAP]
    rng.shuffle(candidates)
    if max_pairs is not None:
        candidates = candidates[:max_pairs]
    out = []
    for a, b in candidates:
        if rng.random() < 0.5:  # which response is shown first must not leak the order
            a, b = b, a
        out.append(label_pair(prompt, a, b, rng, temperature, (scores[a], scores[b])))
    return out


def pairs_from_perturbations(prompt: str, rng: random.Random,
                             temperature: float = DEFAULT_TEMPERATURE, num_pairs: int = 1,
                             num_candidates: int = 4) -> list[dict]:
    """Pairs among the ideal answer and `num_candidates - 1` flawed variants of it."""
    responses = [judge.ideal_response(prompt)]
    responses += [flaws.perturb(prompt, rng)[0] for _ in range(num_candidates - 1)]
    return pairs_from_samples(prompt, responses, rng, temperature, max_pairs=num_pairs)


def preference_records(world: W.World, num: int, seed: int,
                       temperature: float = DEFAULT_TEMPERATURE, stream: str = "preferences",
                       mixture: Mapping[str, float] = tasks.RL_MIXTURE,
                       heldout: bool = False) -> list[dict]:
    """`num` labelled pairs, one per prompt, from the training (or held-out) side of the split."""
    rng = tasks.rng_for(stream, seed)
    out: list[dict] = []
    for _, prompt in tasks.iter_prompts(world, rng, mixture, heldout):
        if len(out) == num:
            return out
        out += pairs_from_perturbations(prompt, rng, temperature)
    raise AssertionError("unreachable")


def bayes_accuracy(records: Iterable[Mapping], temperature: float) -> float:
    """Agreement with the sampled labels of a predictor that knows the gold scores."""
    gaps = [abs(r["chosen_score"] - r["rejected_score"]) for r in records]
    return sum(sigmoid(g / temperature) for g in gaps) / len(gaps)


def content_blind_agreement(record: Mapping) -> float:
    """1, 0.5 or 0: a judge blind to content (`judge.content_blind_score`) prefers the labelled
    `chosen`, ties (the pair differs only in content: a coin flip), or prefers `rejected`."""
    c = judge.content_blind_score(record["prompt"], record["chosen"])
    r = judge.content_blind_score(record["prompt"], record["rejected"])
    return 0.5 if abs(c - r) < _MIN_GAP else float(c > r)


def content_blind_accuracy(records: Iterable[Mapping]) -> float:
    """Mean `content_blind_agreement` with the sampled labels.

    Beside the Bayes accuracy it splits a reward model's shortfall: below this it misreads style,
    harm or refusals; between this and the Bayes accuracy lies what only checking the answer can earn.
    """
    right = [content_blind_agreement(r) for r in records]
    return sum(right) / len(right)


def gold_agreement(records: Iterable[Mapping]) -> float:
    """Share of pairs whose sampled label agrees with the gold order."""
    flags = [r["chosen_score"] > r["rejected_score"] for r in records]
    return sum(flags) / len(flags)
