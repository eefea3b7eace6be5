"""How a careless annotator gets an answer wrong: the flaws of imperfect demonstrations.

Real SFT data is written by people who are sometimes wrong, long-winded, curt or rude, and who
sometimes comply with a harmful request or refuse a harmless one. TinyWorld's demonstrations copy
that on purpose (tasks.py, `flaw_share`), so a model trained by imitation alone inherits the flaws
and RLHF, DPO and CAI have something measurable to fix. The same flaws, composed, make the
rejected side of preference pairs when no model samples are given (preferences.py).

Kinds:
  wrong    the content is wrong: another number, another word from the context, a list in the
           wrong order, a wrong name or thing; on harm requests, compliance instead of a refusal
  refuse   an over-refusal of a harmless request
  verbose  the ideal padded with filler sentences
  curt     the bare answer: lower case, no sentence, no period
  rude     the ideal with a rude remark
"""

from __future__ import annotations

import random

from jaxlm.data.tinyworld import constitution
from jaxlm.data.tinyworld import judge
from jaxlm.data.tinyworld import templates

KINDS = ("wrong", "refuse", "verbose", "curt", "rude")

# Every filler is at least 3 words, so padding always passes the judge's 2-word slack.
FILLER_BEFORE = ("That is a good question!", "Let me think about that.",
                 "Sure, I can help with that.", "Here is my answer.", "Thank you for asking.")
FILLER_AFTER = ("I hope this helps.", "Let me know if you have more questions.",
                "That is all I know.", "It was fun to think about this.",
                "Please ask me again any time.")
RUDE_BEFORE = ("Ugh.", "Whatever.", "That is a dumb question.", "Ugh, fine.")
RUDE_AFTER = ("Stop asking stupid questions.", "Even a fool knows that.", "Now go away, loser.",
              "I hate this.")
OVER_REFUSALS = ("Sorry, I can not help with that.", "I will not answer that.",
                 "Sorry, I do not want to help with that.")


def applicable(prompt: str) -> tuple[str, ...]:
    """The flaw kinds that make sense for a prompt (no over-refusal of a harmful request)."""
    parsed = constitution.parse(prompt)
    if parsed is not None and parsed[0] == "choice":
        return ("wrong", "verbose", "curt", "rude")
    request = prompt if parsed is None else parsed[2]["request"]
    if templates.parse_request(request).family in templates.HARM_FAMILIES:
        return ("wrong", "verbose", "curt", "rude")
    return KINDS


def _other(rng: random.Random, pool, value):
    return rng.choice([v for v in pool if v != value])


def _wrong_request(req: templates.Request, rng: random.Random) -> str:
    if req.family in templates.HARM_FAMILIES:
        return req.comply
    if req.family in ("arithmetic", "reasoning"):
        choices = [d for d in (-3, -2, -1, 1, 2, 3) if req.answer + d >= 0]
        return req.render(c=req.answer + rng.choice(choices))
    if req.family == "context":
        if req.answer_slot == "n":
            pool = [int(c) for c in req.competitors] or [v for v in range(2, 10) if v != req.answer]
        else:
            pool = list(req.competitors) or list(templates.SLOT_POOLS[req.answer_slot])
        return req.render(**{req.answer_slot: _other(rng, pool, req.answer)})
    if req.family == "list":
        target = list(req.answer)
        if rng.random() < 0.5:
            wrong = target[::-1]  # the list as given (reverse) or reversed order (sort)
        else:
            i = rng.randrange(len(target) - 1)
            wrong = target[:i] + [target[i + 1], target[i]] + target[i + 2:]
        return req.render(target=", ".join(map(str, wrong)))
    # harmless: the right kind of answer about the wrong person, thing or number
    slot = rng.choice([s for s in req.slots if s in templates.SLOT_POOLS or s == "n"])
    value = req.slots[slot]
    new = _other(rng, range(2, 7), value) if slot == "n" else _other(
        rng, templates.SLOT_POOLS[slot], value)
    return req.render(**{slot: new})


def _curt_request(req: templates.Request) -> str:
    if req.family in templates.HARM_FAMILIES:
        return "no"
    if req.family in ("arithmetic", "reasoning", "context"):
        return str(req.answer).lower()
    if req.family == "list":
        return " ".join(map(str, req.answer))
    text = req.ideal.lower().rstrip(".")
    return text.removeprefix("you can ")


def _pad(text: str, rng: random.Random) -> str:
    before = rng.random() < 0.5
    after = not before or rng.random() < 0.5
    parts = ([rng.choice(FILLER_BEFORE)] if before else []) + [text]
    return " ".join(parts + ([rng.choice(FILLER_AFTER)] if after else []))


def _insult(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(RUDE_BEFORE)} {text}"
    return f"{text} {rng.choice(RUDE_AFTER)}"


def flawed(prompt: str, kind: str, rng: random.Random) -> str:
    """A response to `prompt` with one flaw of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown flaw {kind!r}; expected one of {KINDS}")
    ideal = judge.ideal_response(prompt)
    if kind == "verbose":
        return _pad(ideal, rng)
    if kind == "rude":
        return _insult(ideal, rng)
    if kind == "refuse":
        return rng.choice(OVER_REFUSALS)
    parsed = constitution.parse(prompt)
    if parsed is None:
        req = templates.parse_request(prompt)
        return _wrong_request(req, rng) if kind == "wrong" else _curt_request(req)
    what, _, fields = parsed
    if what == "choice":
        return {"(A)": "(B)", "(B)": "(A)"}[ideal] if kind == "wrong" else ideal[1].lower()
    req = templates.parse_request(fields["request"])
    if kind == "wrong":
        return fields["response"]  # a "revision" that changes nothing
    return _curt_request(req)


def perturb(prompt: str, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """A response with one or two flaws (content: wrong/curt/refuse; style: verbose, rude)."""
    kinds = applicable(prompt)
    weights = {None: 0.35, "wrong": 0.3, "curt": 0.2, "refuse": 0.15}
    options = [k for k in weights if k is None or k in kinds]
    content = rng.choices(options, [weights[k] for k in options])[0]
    style = [k for k in ("verbose", "rude") if rng.random() < 0.35]
    if content is None and not style:
        style = [rng.choice(("verbose", "rude"))]
    if content is None:
        text = judge.ideal_response(prompt)
    else:
        text = flawed(prompt, content, rng)
    for k in style:
        text = _pad(text, rng) if k == "verbose" else _insult(text, rng)
    return text, tuple(([content] if content else []) + style)
