"""Rewards as programs: any importable callable, named `module:function`, weighted and checked.

A reward function takes the batch's prompts, completions (decoded text) and data records and
returns one score per completion:

    def my_reward(prompts: list[str], completions: list[str], records: list[dict]) -> Sequence[float]

(`records[i]` is the JSONL record prompt i came from, so a verifier can read a reference answer
stored next to the prompt.) A `RewardSet` combines several with weights; each is logged on its
own (`reward/<name>`). Built in:

    jaxlm.rewards:tinyworld_verifier   the correctness part of TinyWorld's gold judge (judge.verify)
    jaxlm.rewards:think_format         1 for `<think>steps</think> answer` (both parts non-empty), else 0

A learned reward model (a jaxlm reward run or `hf:PATH`) scores token ids on the device, not text:
`RewardModelScorer.load(path, tokenizer)` (the tokenizer must be the policy's), which
experiments/grpo.py adds as one more weighted term, `reward/reward_model` (`reward_model.path`).

Failures are loud: a reward that raises, returns the wrong number of scores or a NaN/inf raises
`RewardError` naming the function and the first prompt it failed on, never a silent zero.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jaxlm.data import chat

RewardFn = Callable[[list, list, list], Sequence[float]]

__all__ = ["RewardError", "RewardSet", "RewardModelScorer", "load_reward", "parse_rewards", "tinyworld_verifier",
           "think_format"]


class RewardError(ValueError):
    """A reward function failed (raised, or gave a score that is not a finite number). A ValueError:
    the binaries report it as bad input, in one line naming the function and the prompt."""


def tinyworld_verifier(prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping]) -> list[float]:
    """TinyWorld's verifiable reward: the gold judge's `correct` part (1.0: the right answer, graded
    after any think block), blind to style."""
    from jaxlm.data.tinyworld import judge  # TinyWorld imports jax's CAI pieces: only when asked for.
    del records
    return [judge.verify(p, c) for p, c in zip(prompts, completions)]


def think_format(prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping]) -> list[float]:
    """1.0 when a completion reasons in a closed think block and then answers, else 0.0."""
    del prompts, records
    out = []
    for c in completions:
        r = chat.split_reasoning(c)
        out.append(float(r.closed and bool(r.reasoning) and bool(r.answer)))
    return out


def load_reward(spec: str) -> RewardFn:
    """The callable `module:function` names; ValueError saying what is wrong with `spec`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'module:function', e.g. 'jaxlm.rewards:tinyworld_verifier'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def parse_rewards(text: str) -> list[tuple[str, float]]:
    """`"mod:fn=1.0,mod:other=0.2"` → [(spec, weight)]; a missing weight is 1.0."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        spec, sep, weight = item.partition("=")
        try:
            out.append((spec.strip(), float(weight) if sep else 1.0))
        except ValueError:
            raise ValueError(f"reward {item!r}: the weight after '=' must be a number") from None
    if not out:
        raise ValueError(f"no reward in {text!r}; expected e.g. 'jaxlm.rewards:tinyworld_verifier=1.0'")
    return out


def _short(name: str) -> str:
    return name.rpartition(":")[2]


@dataclasses.dataclass
class RewardSet:
    """Weighted reward functions: `score(...)` → (total [n], {short name: scores [n]})."""

    terms: list[tuple[str, RewardFn, float]]  # (spec, function, weight)

    @classmethod
    def from_specs(cls, specs: Sequence[tuple[str, float]]) -> "RewardSet":
        names = [_short(s) for s, _ in specs]
        if len(set(names)) < len(names):
            raise ValueError(f"two rewards share a function name: {[s for s, _ in specs]}")
        return cls([(spec, load_reward(spec), float(w)) for spec, w in specs])

    @property
    def names(self) -> list[str]:
        return [_short(spec) for spec, _, _ in self.terms]

    def score(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping]
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(completions)
        total, parts = np.zeros(n, np.float64), {}
        for spec, fn, weight in self.terms:
            scores = _call(spec, fn, list(prompts), list(completions), list(records))
            parts[_short(spec)] = scores
            total += weight * scores
        return total.astype(np.float32), parts


def _call(spec: str, fn: RewardFn, prompts: list, completions: list, records: list) -> np.ndarray:
    try:
        scores = fn(prompts, completions, records)
        values = np.asarray([float(s) for s in scores], np.float64)
    except Exception as e:  # noqa: BLE001  (any failure of user code is reported with its prompt)
        raise RewardError(f"reward {spec} raised {type(e).__name__}: {e}; {_first_failure(fn, prompts, completions, records)}") from e
    if values.shape != (len(completions),):
        raise RewardError(f"reward {spec} returned {values.size} scores for {len(completions)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        i = bad[0]
        raise RewardError(f"reward {spec} gave {values[i]} on prompt {prompts[i]!r} (completion {completions[i]!r}); "
                          f"{len(bad)} of {len(values)} scores are not finite")
    return values


def _first_failure(fn: RewardFn, prompts: list, completions: list, records: list) -> str:
    """Which prompt makes `fn` raise, found by calling it on one completion at a time."""
    for i in range(len(completions)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], records[i:i + 1])
        except Exception:  # noqa: BLE001
            return f"first failing prompt: {prompts[i]!r} (completion {completions[i]!r})"
    return "each prompt alone succeeds (it fails only on the whole batch)"


@dataclasses.dataclass(frozen=True)
class RewardModelScorer:
    """A learned reward model as a reward term: ``scorer(batch) -> [B]`` float64 scores of the rows
    (``tokens``, ``positions``, ``segment_ids`` ``[B, P + N]``, as `sampling.prompt_response_layout`
    lays out prompt + completion), read at each row's last real token, the parameters frozen.

    It scores token ids, not text, so it must read the policy's tokens: `load` refuses another
    tokenizer. One compiled function per model config (`ScalarHeadModel` hashes by config).
    """

    model: Any  # jaxlm.reward_model.ScalarHeadModel
    params: Any
    path: str

    @classmethod
    def load(cls, path: str, tokenizer, flag: str = "reward_model.path") -> "RewardModelScorer":
        """A jaxlm reward run's workdir or `hf:PATH` (a ...ForSequenceClassification export)."""
        from jaxlm import init_source  # orbax and the HF loaders: only when a reward model is asked for.
        from jaxlm.hf import load_tokenizer
        from jaxlm.model import ModelConfig
        from jaxlm.reward_model import ScalarHeadModel
        meta = init_source.load_meta(path, flag)
        if meta.get("stage") != "reward":
            raise ValueError(f"--config.{flag}={path} is a {meta.get('stage')!r} checkpoint, not a reward model "
                             "(a jaxlm reward run, or hf:PATH of a ...ForSequenceClassification export)")
        if not init_source.same_tokenizer(load_tokenizer(meta["tokenizer"]), tokenizer):
            raise ValueError(f"--config.{flag}={path} uses another tokenizer ({meta['tokenizer']}) than the policy; "
                             "a reward model must read the policy's tokens")
        params, _ = init_source.load_params(path, flag=flag)
        return cls(ScalarHeadModel(ModelConfig(**meta["model"])), params, path)

    def __call__(self, batch) -> np.ndarray:
        return np.asarray(_score_rows(self.model, self.params, batch["tokens"], batch["positions"],
                                      batch["segment_ids"]), np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(model, params, tokens, positions, segment_ids) -> jax.Array:
    return model.score(jax.lax.stop_gradient(params), tokens, positions, segment_ids)
