"""The TinyWorld constitution: its principles, and the prompts Constitutional AI asks parsed back.

Each principle is phrased three ways, as in Bai et al. (2022): a critique request, a revision
request and a choice between two responses. The principles are short and written in the closed
vocabulary, because the model that reads them has a couple of million parameters.

A principle also names the judge part it is about (`part`), so the gold answer to a choice prompt
("which response is more polite?") is computable from the prompt text, and the choice and revision
prompts can be taught in SFT (tasks.py families "revise" and "choose"): a model this small cannot
revise or compare unless it has seen the format, much as the paper's models had learnt to follow
instructions before they were asked to critique themselves. Critiques are free text with no gold
answer, so no family teaches them; CAI here can skip the critique and revise directly.

The `Principle` type and the prompt shapes are `jaxlm.cai`'s (`critique_prompt`,
`revision_prompt`, `choice_prompt`, imported here so TinyWorld's tasks teach exactly the prompts
CAI asks); `parse` reads them back for the judge. One line each, newlines separate them;
newlines inside a response become spaces:

    Request: <request>
    Response: <response>
    <principle.critique or principle.revision>

    Request: <request>
    (A) <response a>
    (B) <response b>
    <principle.choice>
"""

from __future__ import annotations

import dataclasses
import re

from jaxlm.cai import Principle, choice_prompt, critique_prompt, revision_prompt  # noqa: F401  (CAI's)


CORE = ("arithmetic", "context", "list", "harmful", "harmless")
PRINCIPLES: tuple[Principle, ...] = (
    Principle("polite",
              "Find ways the response is rude or unkind.",
              "Rewrite the response to be polite and kind.",
              "Which response is more polite? (A) or (B)",
              part="polite", flaw="rude", families=CORE),
    Principle("harmless",
              "Find ways the response helps someone hurt a person, an animal or a thing.",
              "Rewrite the response to say no to the harm, politely, and give a kind idea.",
              "Which response is less harmful? (A) or (B)",
              part="refuses_harm", flaw="wrong", families=("harmful",)),
    Principle("helpful",
              "Find ways the response says no to a request that is not harmful.",
              "Rewrite the response to help with the request.",
              "Which response helps more with the request? (A) or (B)",
              part="no_over_refusal", flaw="refuse", families=("arithmetic", "context", "list",
                                                                "harmless")),
    Principle("correct",
              "Find ways the response is wrong.",
              "Rewrite the response to be right.",
              "Which response is right? (A) or (B)",
              part="correct", flaw="wrong", families=("arithmetic", "context", "list")),
    Principle("concise",
              "Find ways the response is too long.",
              "Rewrite the response to be short and clear.",
              "Which response is short and clear? (A) or (B)",
              part="concise", flaw="verbose", families=CORE),
    Principle("complete",
              "Find ways the response is too short or does not end well.",
              "Rewrite the response as a complete sentence that ends with a period.",
              "Which response is a complete sentence? (A) or (B)",
              part="well_formed", flaw="curt", families=CORE),
)
BY_NAME = {p.name: p for p in PRINCIPLES}


_ONE_RESPONSE = re.compile(r"Request: (?P<request>[^\n]*)\nResponse: (?P<response>[^\n]*)\n"
                           r"(?P<instruction>[^\n]*)")
_TWO_RESPONSES = re.compile(r"Request: (?P<request>[^\n]*)\n\(A\) (?P<a>[^\n]*)\n"
                            r"\(B\) (?P<b>[^\n]*)\n(?P<instruction>[^\n]*)")


def parse(prompt: str) -> tuple[str, Principle, dict[str, str]] | None:
    """('critique'|'revision'|'choice', principle, fields) for a constitution prompt, else None."""
    text = prompt.strip()
    m = _ONE_RESPONSE.fullmatch(text)
    if m:
        for p in PRINCIPLES:
            if m["instruction"] == p.revision:
                return "revision", p, {"request": m["request"], "response": m["response"]}
            if m["instruction"] == p.critique:
                return "critique", p, {"request": m["request"], "response": m["response"]}
        return None
    m = _TWO_RESPONSES.fullmatch(text)
    if m:
        for p in PRINCIPLES:
            if m["instruction"] == p.choice:
                return "choice", p, {"request": m["request"], "a": m["a"], "b": m["b"]}
    return None


def as_json() -> list[dict]:
    """The constitution as written to constitution.json."""
    return [dataclasses.asdict(p) for p in PRINCIPLES]
