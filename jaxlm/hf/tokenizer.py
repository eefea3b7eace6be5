"""A Hugging Face checkpoint's tokenizer behind jaxlm's tokenizer interface, with its chat template.

`HFTokenizer.load(directory)` reads what a Hugging Face model directory ships:

- `tokenizer.json` (the `tokenizers` library's format: Llama 3, Qwen2, Mistral, most models
  since 2023), preferred when present, as `transformers`' fast tokenizers do; otherwise
- `tokenizer.model` (a SentencePiece model: Llama 2, early Mistral, jaxlm's own exports);
- `tokenizer_config.json` / `special_tokens_map.json` for the BOS/EOS/PAD/UNK strings,
  `generation_config.json` for the extra stop ids, and the chat template from
  `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json["chat_template"]`.

The interface is `jaxlm.data.tokenizer.Tokenizer`'s: `encode` (never adds BOS/EOS), `decode`
(drops pad/BOS/EOS), `vocab_size`, `pad_id`/`bos_id`/`eos_id`/`unk_id` (-1 when the tokenizer
has none), `piece_to_id`, `id_to_piece`; it pickles (grain workers). Special-token strings in
text (`<|im_start|>`, `<s>`, ...) encode as their single tokens, as `transformers` does, which
chat templates rely on.

Chat templates are rendered with jinja2 in a sandbox, with the variables `transformers` passes
(`messages`, `add_generation_prompt`, the special-token strings, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML). `encode_chat_prompt(messages)` gives the
tokens to generate from; `encode_chat_example(messages)` gives (tokens, loss_mask) with
`loss_mask[t] = 1` on the tokens of every assistant turn up to and including the token that
closes it (the template's EOS / end-of-turn token, so the model learns to stop), and 0
elsewhere: exactly jaxlm's chat contract, with the checkpoint's own format. Assistant turns are
found by rendering the conversation up to each of them with `add_generation_prompt=True` and
checking that it is a prefix of the conversation, as text and as tokens (templates that rewrite
earlier turns, e.g. drop old reasoning, or a prompt whose last token merges with the answer's
first, are refused with an error): the turn's targets are the tokens after that prefix, through
its first stop token. `stop_ids` are EOS, generation_config.json's eos ids and the template's
end-of-turn token (found by rendering a probe conversation), for samplers to stop on.

The pad id: checkpoints without a pad token (Llama 2/3) get `pad_id = eos_id`. jaxlm marks
padding with segment ids and masks, never by token value, so the filler id changes nothing.

Left out: slow `transformers` tokenizer classes other than SentencePiece (e.g. a `vocab.json` +
`merges.txt` pair without `tokenizer.json`), `tools`/`documents` in templates, and the
"legacy=False" SentencePiece variant (text after a special token in an SP-only checkpoint gets
SentencePiece's dummy-prefix space, like `transformers`' legacy Llama tokenizer).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxlm.data.tokenizer import Tokenizer

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json", "chat_template.jinja", "chat_template.json")
# transformers' `clean_up_tokenization`, applied by its decode when the config asks for it.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_content(value: Any) -> str | None:
    """A special token from a tokenizer config: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """A `tokenizer.json` or `tokenizer.model` tokenizer with the checkpoint's special tokens and chat template."""

    def __init__(self, files: Mapping[str, bytes], path: str | None = None):
        """`files`: the raw contents of the tokenizer files of a checkpoint directory (see `_FILES`)."""
        self.path = path
        self._files = {k: bytes(v) for k, v in files.items()}
        config = self._json("tokenizer_config.json")
        special_map = self._json("special_tokens_map.json")
        if "tokenizer.json" in self._files:
            import tokenizers

            self.backend = "tokenizers"
            self._tok = tokenizers.Tokenizer.from_str(self._files["tokenizer.json"].decode("utf-8"))
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._vocab_size = max(vocab.values()) + 1
            self._added = [t.content for t in self._tok.get_added_tokens_decoder().values()]
        elif "tokenizer.model" in self._files:
            import sentencepiece as spm

            self.backend = "sentencepiece"
            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(self._files["tokenizer.model"])
            except Exception as e:
                raise ValueError(f"{path}/tokenizer.model is not a SentencePiece model ({e})") from None
            self._vocab_size = self._sp.GetPieceSize()
            decoder = config.get("added_tokens_decoder") or {}
            self._added = [c for c in (_token_content(v) for v in decoder.values()) if c]
        else:
            raise FileNotFoundError(f"{path or 'tokenizer files'}: neither tokenizer.json nor tokenizer.model found")

        # Special tokens: tokenizer_config.json, then special_tokens_map.json, then (SentencePiece) the model.
        self.special_tokens: dict[str, str] = {}
        for role in SPECIAL_ROLES:
            content = _token_content(config.get(f"{role}_token")) or _token_content(special_map.get(f"{role}_token"))
            if content is None and self.backend == "sentencepiece":
                i = getattr(self._sp, f"{role}_id")()
                content = self._sp.IdToPiece(i) if i >= 0 else None
            if content is not None:
                if self._lookup(content) is None:
                    raise ValueError(f"{path}: {role}_token {content!r} is not in the vocabulary")
                self.special_tokens[role] = content
        extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
        self._specials = sorted({*self.special_tokens.values(), *self._added,
                                 *(c for c in map(_token_content, extra) if c)}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._dropped_on_decode = {i for i in (self.pad_id, self.bos_id, self.eos_id) if i >= 0}
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))

        generation = self._json("generation_config.json")
        stops = generation.get("eos_token_id")
        self._generation_stops = [stops] if isinstance(stops, int) else list(stops or [])
        self._stop_ids: tuple[int, ...] | None = None

        self.chat_template = self._find_chat_template(config)
        self._compiled_template = None

    # --- Loading and saving -----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """From a Hugging Face model directory (or the path of a tokenizer.json / tokenizer.model in one)."""
        path = os.fspath(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        files = {}
        for name in _FILES:
            full = os.path.join(directory, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    files[name] = f.read()
        if os.path.isfile(path) and os.path.basename(path) == "tokenizer.model":
            files.pop("tokenizer.json", None)  # The caller asked for the SentencePiece model explicitly.
        return cls(files, path=directory)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer files this tokenizer was loaded from into `directory`."""
        os.makedirs(directory, exist_ok=True)
        for name, data in self._files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)

    def __getstate__(self):
        return {"files": self._files, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["files"], path=state["path"])

    def __repr__(self):
        return f"HFTokenizer(path={self.path!r}, backend={self.backend}, vocab_size={self.vocab_size})"

    def _json(self, name: str) -> dict:
        if name not in self._files:
            return {}
        try:
            value = json.loads(self._files[name].decode("utf-8"))
        except ValueError as e:
            raise ValueError(f"{self.path}/{name} is not valid JSON ({e})") from None
        return value if isinstance(value, dict) else {}

    def _find_chat_template(self, config: dict) -> str | None:
        if "chat_template.jinja" in self._files:
            return self._files["chat_template.jinja"].decode("utf-8")
        template = self._json("chat_template.json").get("chat_template") or config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    # --- Encoding ---------------------------------------------------------------------------------

    def _lookup(self, piece: str) -> int | None:
        if self.backend == "tokenizers":
            return self._tok.token_to_id(piece)
        i = self._sp.PieceToId(piece)
        return i if self._sp.IdToPiece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS; special-token strings become their tokens."""
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, [(start, end) character span of each token in `text`])."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.backend == "tokenizers":
            encoding = self._tok.encode(text, add_special_tokens=False)
            return list(encoding.ids), [tuple(o) for o in encoding.offsets]
        ids, offsets, start = [], [], 0
        chunks = [] if self._special_re is None else list(self._special_re.finditer(text))
        for match in [*chunks, None]:
            end = len(text) if match is None else match.start()
            if end > start:
                self._sp_encode(text[start:end], start, ids, offsets)
            if match is not None:
                ids.append(self._lookup(match.group()))
                offsets.append(match.span())
                start = match.end()
        return ids, offsets

    def _sp_encode(self, chunk: str, char_offset: int, ids: list, offsets: list):
        """SentencePiece reports byte offsets into the UTF-8 chunk; convert them to characters."""
        byte_to_char = [0] * (len(chunk.encode("utf-8")) + 1)
        position = 0
        for i, ch in enumerate(chunk):
            for _ in range(len(ch.encode("utf-8"))):
                byte_to_char[position] = i
                position += 1
        byte_to_char[position] = len(chunk)
        for piece in self._sp.encode(chunk, return_type="proto").pieces:
            ids.append(piece.id)
            offsets.append((char_offset + byte_to_char[piece.begin], char_offset + byte_to_char[piece.end]))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or 1-D array); pad, BOS and EOS are dropped, other specials kept."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:8]}")
        ids = [i for i in ids if i not in self._dropped_on_decode]
        if self.backend == "tokenizers":
            text = self._tok.decode(ids, skip_special_tokens=False)
        else:
            text = self._sp_decode(ids)
        if self._cleanup:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    def _sp_decode(self, ids: list[int]) -> str:
        """Special tokens are SentencePiece control pieces (decoded to ''): write them back as text."""
        special = {self._lookup(s): s for s in self._specials}
        parts, run = [], []
        for i in ids:
            if i in special:
                parts += [self._sp.DecodeIds(run), special[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self._sp.DecodeIds(run)

    # --- Vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id is in [0, vocab_size) (the model's embedding may have more rows)."""
        return self._vocab_size

    def _special_id(self, role: str) -> int:
        content = self.special_tokens.get(role)
        return -1 if content is None else self._lookup(content)

    @property
    def bos_id(self) -> int:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos")

    @property
    def unk_id(self) -> int:
        return self._special_id("unk")

    @property
    def pad_id(self) -> int:
        """The pad token, or EOS when the checkpoint defines none (see the module docstring)."""
        return self._special_id("pad") if "pad" in self.special_tokens else self.eos_id

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; `unk_id` (-1 if there is none) when it is not in the vocabulary."""
        i = self._lookup(piece)
        return self.unk_id if i is None else i

    def id_to_piece(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        if self.backend == "tokenizers":
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                raise ValueError(f"token id {token_id} is not in the vocabulary")
            return piece
        return self._sp.IdToPiece(token_id)

    @property
    def special_strings(self) -> tuple[str, ...]:
        """Every special/added token's text (longest first): in text, each encodes as its one token."""
        return tuple(self._specials)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated turn: EOS, `generation_config.json`'s eos_token_id(s), and the
        chat template's end-of-turn token (e.g. `<|im_end|>`, `<|eot_id|>`).

        A base checkpoint often has EOS `<|endoftext|>` while its template closes assistant turns
        with another token; a model fine-tuned on the template stops with that one, so samplers
        must stop on it too (`jaxlm.data.chat.stop_ids`).
        """
        if self._stop_ids is None:
            turn = self._end_of_turn_id()
            ids = [self.eos_id, *self._generation_stops, *([] if turn is None else [turn])]
            self._stop_ids = tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < self.vocab_size))
        return self._stop_ids

    def _end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an assistant message's text, if any."""
        if self.chat_template is None or self._special_re is None:
            return None
        probe = "jaxlm end of turn probe"
        for messages in ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                         [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": probe}]):
            try:
                text = self.render_chat(messages)
            except Exception:  # Templates may insist on a system turn, or refuse the probe: try the next.
                continue
            at = text.rfind(probe)
            if at < 0:
                continue
            match = self._special_re.search(text, at + len(probe))
            if match is not None and not text[at + len(probe):match.start()].strip():
                return self._lookup(match.group())
            return None
        return None

    # --- Chat template ----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages`, as text (what `transformers`' apply_chat_template renders)."""
        if self.chat_template is None:
            raise ValueError(f"{self} has no chat template (tokenizer_config.json has no 'chat_template')")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        variables = {f"{role}_token": content for role, content in self.special_tokens.items()}
        return self._compiled_template.render(messages=[dict(m) for m in messages],
                                              add_generation_prompt=add_generation_prompt,
                                              tools=None, documents=None, **variables)

    def encode_chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Tokens to generate the next assistant turn from (the template's generation prompt included)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=True))

    def encode_chat_example(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """(tokens, loss_mask) of a conversation; the mask covers each assistant turn and its closing token.

        Tokens are the whole rendered conversation encoded at once (= apply_chat_template with
        tokenize=True). For each assistant turn, the conversation before it is rendered with
        `add_generation_prompt=True`: those tokens must be a prefix of the whole conversation's
        (what the model is prompted with at sampling time is then exactly what it was trained to
        continue), and the turn's targets are the tokens after that prefix, up to and including
        the first stop token (`stop_ids`; what follows, e.g. a newline, is never generated).
        Raises ValueError, naming the message, when the template is not prefix-consistent as
        text (it rewrites earlier turns) or as tokens (a merge across the prompt's end).
        """
        messages = [dict(m) for m in messages]
        text = self.render_chat(messages)
        ids, offsets = self.encode_with_offsets(text)
        stops = set(self.stop_ids)
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prefix = self.render_chat(messages[:k], add_generation_prompt=True)
            through = self.render_chat(messages[:k + 1])
            if not (through.startswith(prefix) and text.startswith(through)):
                raise ValueError(f"the chat template of {self.path} does not render message {k} (assistant) as "
                                 "an extension of the conversation before it; cannot tell which tokens are the "
                                 "assistant's")
            prompt_ids = self.encode(prefix)
            start = len(prompt_ids)
            if ids[:start] != prompt_ids:
                raise ValueError(
                    f"the chat template of {self.path}: the generation prompt before message {k} (assistant) "
                    f"tokenizes differently inside the conversation (prompt ends {prefix[-20:]!r}, "
                    f"conversation continues {text[len(prefix):len(prefix) + 20]!r}): training tokens would not "
                    "match what the model is prompted with")
            end = next((t for t in range(start, len(ids)) if offsets[t][0] >= len(through)), len(ids))
            closing = next((t for t in range(start, end) if ids[t] in stops), None)
            end = end if closing is None else closing + 1
            mask[start:end] = [1] * (end - start)
        return ids, mask


def _compile_template(source: str):
    """A jinja2 template in an immutable sandbox (templates come from downloaded checkpoints)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (TRL's assistant-mask markers): render the body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def is_hf_tokenizer_path(path: str | os.PathLike) -> bool:
    """True for a directory holding tokenizer.json or tokenizer.model, or a tokenizer.json file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model"))
    return os.path.basename(path) == "tokenizer.json"


def load_tokenizer(path: str | os.PathLike):
    """jaxlm's `Tokenizer` for a SentencePiece `.model` file; `HFTokenizer` for a Hugging Face directory.

    The one call checkpoint metadata (`meta["tokenizer"]`) and stage binaries need, whichever
    kind of tokenizer a run started from.
    """
    if is_hf_tokenizer_path(path):
        return HFTokenizer.load(path)
    return Tokenizer.load(path)
