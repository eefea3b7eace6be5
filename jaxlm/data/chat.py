"""The chat format: one template for SFT, preferences, prompts and sampling.

A conversation is encoded as

    [BOS] (<|system|> system-text)? (<|user|> user-text <|assistant|> assistant-text [EOS])+

and a prompt for generation as the same thing up to and including the last `<|assistant|>`:

    [BOS] <|user|> prompt-text <|assistant|>          (the model writes the response, then EOS)

The role markers are single tokens of our tokenizer (ids 4, 5, 6; `jaxlm.data.tokenizer`), so
no text can imitate them by accident and no spacing or newline convention is needed around
them: marker and text are simply concatenated. Only the assistant closes its turn with EOS,
because only the assistant's turns are generated; a user turn ends where `<|assistant|>`
begins. So a sampled response ends at EOS, and `decode_response` stops there.

Loss mask (the pipeline's convention: `loss_mask[t] = 1` means token t is a target, predicted
from the tokens before it): 1 on every assistant token and on the EOS closing each assistant
turn; 0 on BOS, markers, system and user text. Multi-turn conversations learn every assistant
turn (`encode_continuation` learns only the turns after a given prompt: preference sides, and
SFT's `last_turn_only`). Packing keeps this mask per example (`jaxlm.data.packing`), and the next-token targets
never cross a segment boundary (`losses.next_token_targets`).

Inputs are either a prompt string (plus a response string) or a list of messages
`[{"role": "system"|"user"|"assistant", "content": str}, ...]`: an optional system message
first, then user and assistant turns alternating, starting with the user. Every content must
be a non-empty string; anything else raises ValueError saying which message is wrong (the data
pipelines turn that into an error naming the file and line).

Checkpoints from Hugging Face bring their own format. When the tokenizer has a chat template
(`jaxlm.hf.HFTokenizer` with a `chat_template`, e.g. ChatML's `<|im_start|>` /
`<|im_end|>` or Llama 3's headers and `<|eot_id|>`), every function here follows it instead, with
the same contract: `encode_prompt` renders the conversation with `add_generation_prompt=True`;
`encode_example` renders the whole conversation, and each assistant turn's targets are the
tokens after its generation prompt, through the token that closes it (the prompt's tokens must
be a prefix of the conversation's, else a ValueError says which message). Tokens the template
writes after the last assistant turn's closing token (ChatML's trailing newline) are dropped, so
`encode_prompt(p) + response tokens + closing token == encode_example(p, response)` holds here
too: a reward model scores a PPO rollout exactly as it was trained to. Generation stops on any of
`stop_ids(tokenizer)` (EOS plus the template's end-of-turn token). Content that contains one of
the tokenizer's special-token strings is refused, as role markers are for jaxlm's format.
jaxlm's own SentencePiece tokenizers keep jaxlm's format above, unchanged.

Reasoning. An assistant turn may think before it answers: `<think>steps</think> answer`
(`THINK_OPEN`, `THINK_CLOSE`, DeepSeek-R1's convention). The block is ordinary assistant content:
it is learned in SFT like the rest of the turn, sampled like it, and generation still ends only at
EOS (a `</think>` is not a stop). `split_reasoning` separates the two parts; judges and verifiers
grade the answer alone, and a turn whose block never closes has no answer. TinyWorld's pipeline
trains its tokenizer with both markers as single tokens (`REASONING_MARKERS`); with any other
tokenizer they are plain text.

Left out on purpose: tool/function-call roles, per-turn "train on this turn" flags, Jinja
templates for jaxlm's own tokenizers (one explicit template in code is easier to check than a
template language), and a generation prompt for anything but the assistant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
MARKERS = {SYSTEM: "<|system|>", USER: "<|user|>", ASSISTANT: "<|assistant|>"}

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_MARKERS = (THINK_OPEN, THINK_CLOSE)

Messages = list[dict[str, str]]


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer brings its own chat template (a Hugging Face checkpoint's)."""
    return getattr(tokenizer, "chat_template", None) is not None


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids a chat response ends with: EOS, plus the template's end-of-turn token(s) if any.

    Pass them to `sampling.generate(eos_id=...)`; `decode_response` cuts at the first of them.
    """
    ids = getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,)
    return tuple(i for i in ids if i >= 0)


class Reasoned(NamedTuple):
    reasoning: str  # inside the think block ("" when there is none)
    answer: str  # after the block: what is graded ("" when the block never closes)
    has_block: bool  # a think block was opened
    closed: bool  # ... and closed


def split_reasoning(text: str) -> Reasoned:
    """(reasoning, answer) of a response `<think>reasoning</think> answer`; text without a block
    is all answer. Text before `<think>` counts as reasoning; the answer follows the first `</think>`."""
    start = text.find(THINK_OPEN)
    if start < 0:
        return Reasoned("", text.strip(), False, False)
    end = text.find(THINK_CLOSE, start)
    if end < 0:
        return Reasoned((text[:start] + text[start + len(THINK_OPEN):]).strip(), "", True, False)
    reasoning = (text[:start] + text[start + len(THINK_OPEN):end]).strip()
    return Reasoned(reasoning, text[end + len(THINK_CLOSE):].strip(), True, True)


def _marker_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for role, piece in MARKERS.items():
        i = tokenizer.piece_to_id(piece)
        if i < 0 or i == tokenizer.unk_id or tokenizer.id_to_piece(i) != piece:
            if hasattr(tokenizer, "chat_template"):  # A Hugging Face tokenizer without a template.
                raise ValueError(f"{tokenizer} has no chat template and no jaxlm role markers: add a "
                                 f"'chat_template' (e.g. ChatML) to {tokenizer.path}/tokenizer_config.json")
            raise ValueError(f"{tokenizer} has no single token for the role marker {piece!r}; "
                             "train the tokenizer with jaxlm.data.tokenizer.train_tokenizer")
        ids[role] = i
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise ValueError(f"{tokenizer} has no BOS or EOS piece; the chat format needs both")
    return ids


def _check_content(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"{where} is empty")
    for marker in MARKERS.values():
        if marker in value:  # it would encode as the real marker token and fake a turn
            raise ValueError(f"{where} contains the role marker {marker!r}")
    return value


def to_messages(prompt_or_messages: str | Sequence[Mapping[str, Any]], response: str | None = None) -> Messages:
    """Validated messages from a prompt string or a message list, plus an optional response.

    Raises ValueError/TypeError naming the bad message: unknown role, empty content, a system
    message anywhere but first, two turns of the same speaker in a row, no user turn.
    """
    if isinstance(prompt_or_messages, str):
        messages = [{"role": USER, "content": _check_content(prompt_or_messages, "prompt")}]
    elif isinstance(prompt_or_messages, Sequence):
        messages = []
        for i, m in enumerate(prompt_or_messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r:.80}")
            if m["role"] not in ROLES:
                raise ValueError(f"message {i} has role {m['role']!r}; expected one of {ROLES}")
            messages.append({"role": m["role"], "content": _check_content(m["content"], f"message {i} content")})
    else:
        raise TypeError(f"expected a prompt string or a list of messages, got {type(prompt_or_messages).__name__}")
    if response is not None:
        messages.append({"role": ASSISTANT, "content": _check_content(response, "response")})

    turns = messages[1:] if messages and messages[0]["role"] == SYSTEM else messages
    if not turns:
        raise ValueError("no user message")
    for i, m in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if m["role"] != expected:
            offset = len(messages) - len(turns)
            raise ValueError(f"message {i + offset} is from {m['role']!r} where {expected!r} was expected "
                             "(an optional system message first, then user and assistant alternating)")
    return messages


def _encode(tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    markers = _marker_ids(tokenizer)
    tokens, mask = [tokenizer.bos_id], [0]
    for m in messages:
        content = tokenizer.encode(m["content"])
        tokens += [markers[m["role"]]] + content
        if m["role"] == ASSISTANT:
            tokens.append(tokenizer.eos_id)
            mask += [0] + [1] * (len(content) + 1)
        else:
            mask += [0] * (len(content) + 1)
    return tokens, mask


def _check_specials(tokenizer, messages: Messages) -> None:
    """Refuse content that holds a special-token string: it would encode as that token and could
    fake a turn boundary of the template."""
    specials = getattr(tokenizer, "special_strings", ())
    for i, m in enumerate(messages):
        for special in specials:
            if special in m["content"]:
                raise ValueError(f"message {i} content contains the special token {special!r}")


def _encode_with_template(tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    _check_specials(tokenizer, messages)
    tokens, mask = tokenizer.encode_chat_example(messages)
    last = max((t for t, m in enumerate(mask) if m), default=-1)
    if last < 0:
        raise ValueError(f"the chat template of {tokenizer.path} left no assistant token to learn")
    return tokens[:last + 1], mask[:last + 1]  # What follows the closing token is never generated.


def encode_example(tokenizer, prompt_or_messages: str | Sequence[Mapping[str, Any]],
                   response: str | None = None) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of a whole conversation that ends with an assistant turn.

    `encode_example(tok, "What is 2 plus 2?", "2 plus 2 is 4.")` or
    `encode_example(tok, [{"role": "user", ...}, {"role": "assistant", ...}, ...])`.
    loss_mask is 1 exactly on assistant tokens and the EOS (or the template's end-of-turn token)
    closing each assistant turn.
    """
    messages = to_messages(prompt_or_messages, response)
    if messages[-1]["role"] != ASSISTANT:
        raise ValueError("the conversation must end with an assistant message (nothing to learn otherwise)")
    if has_chat_template(tokenizer):
        return _encode_with_template(tokenizer, messages)
    return _encode(tokenizer, messages)


def encode_continuation(tokenizer, prompt: str | Sequence[Mapping[str, Any]],
                        continuation: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of prompt + continuation, learning only the continuation's assistant turns.

    For preference sides and last-turn-only SFT: earlier assistant turns inside a multi-turn
    prompt (HH-RLHF style) are context, not response, so they must not count as targets (they
    would enter length-averaged DPO, IPO, the NLL term and the logged log-probs). The prompt must
    end with a user message; its tokens (`encode_prompt`) must be a prefix of the whole
    conversation's, which holds for jaxlm's format and is checked for a chat template.
    """
    prompt_messages = to_messages(prompt)
    if prompt_messages[-1]["role"] != USER:
        raise ValueError("the prompt must end with a user message")
    tokens, mask = encode_example(tokenizer, prompt_messages + [dict(m) for m in continuation])
    head = encode_prompt(tokenizer, prompt_messages)
    if tokens[:len(head)] != head:
        raise ValueError("the chat template renders the prompt differently inside the whole conversation, so "
                         "the response tokens cannot be told apart from the prompt's")
    return tokens, [0] * len(head) + mask[len(head):]


def encode_prompt(tokenizer, prompt_or_messages: str | Sequence[Mapping[str, Any]]) -> list[int]:
    """Tokens of a generation prompt: the conversation so far, ending with `<|assistant|>`.

    The conversation must end with a user message. encode_prompt(p) + encode(response) + [EOS]
    is exactly encode_example(p, response)'s tokens.
    """
    messages = to_messages(prompt_or_messages)
    if messages[-1]["role"] != USER:
        raise ValueError("a prompt must end with a user message (the assistant answers it)")
    if has_chat_template(tokenizer):
        _check_specials(tokenizer, messages)
        return tokenizer.encode_chat_prompt(messages)
    tokens, _ = _encode(tokenizer, messages)
    return tokens + [_marker_ids(tokenizer)[ASSISTANT]]


def decode_response(tokenizer, ids) -> str:
    """Text of a generated response: the ids up to (not including) the first stop id (EOS, or the
    template's end-of-turn token); pads dropped."""
    ids = [int(i) for i in ids]
    stops = set(stop_ids(tokenizer))
    end = next((t for t, i in enumerate(ids) if i in stops), len(ids))
    ids = ids[:end]
    # Ids past the tokenizer (a model vocabulary padded to a multiple of 128) have no text.
    limit = getattr(tokenizer, "vocab_size", None) or len(ids) + max(ids, default=0) + 1
    return tokenizer.decode([i for i in ids if i < limit])


class Responses(NamedTuple):
    texts: list[str]  # decoded, up to the first stop id (EOS)
    tokens: list[list[int]]  # generated ids, the closing stop id included when the row ended
    prompt_tokens: list[list[int]]  # encode_prompt of each prompt
    ended: list[bool]  # the response closed with a stop id (False: cut at max_new_tokens)


def generate_responses(model, params, tokenizer, prompts: Sequence[str | Sequence[Mapping[str, Any]]], *,
                       max_new_tokens: int, rng=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       greedy: bool = False, batch_size: int = 64, bucket: int = 16, mesh=None) -> Responses:
    """Answer each prompt with the chat template: encode_prompt → sampling.generate → decode_response.

    Prompts run in batches of exactly `batch_size` rows (the last one filled up with copies of
    a prompt and dropped), so a run compiles once per prompt-width bucket. Batch i samples with
    `fold_in(rng, i)`. Use this, not `sampling.generate_text`, for chat models: generate_text
    feeds raw text after BOS, without the role markers the model was fine-tuned on.
    """
    import jax  # local: the rest of the chat format is plain Python and numpy

    from jaxlm import sampling

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    texts, tokens, ended = [], [], []
    for i, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        prompt_tokens, lengths = sampling.prompts_to_batch(rows, tokenizer.pad_id, bucket)
        out = sampling.generate(model, params, prompt_tokens, lengths, max_new_tokens=max_new_tokens,
                                rng=None if rng is None else jax.random.fold_in(rng, i), temperature=temperature,
                                top_k=top_k, top_p=top_p, eos_id=stop_ids(tokenizer), pad_id=tokenizer.pad_id,
                                greedy=greedy, mesh=mesh)
        out_tokens, out_lengths, out_ended = jax.device_get((out.tokens, out.lengths, out.ended))
        for row in range(len(chunk)):
            ids = [int(t) for t in np.asarray(out_tokens[row, :int(out_lengths[row])])]
            tokens.append(ids)
            ended.append(bool(out_ended[row]))
            texts.append(decode_response(tokenizer, ids))
    return Responses(texts=texts, tokens=tokens, prompt_tokens=encoded, ended=ended)
