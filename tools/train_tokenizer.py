r"""Trains a SentencePiece tokenizer with jaxlm's fixed special ids and chat role markers.

    python -m tools.train_tokenizer --input='data/*.txt' --vocab_size=1000 --out=DIR/tokenizer

writes DIR/tokenizer.model and DIR/tokenizer.vocab (pad=0, bos=1, eos=2, unk=3, then <|system|>,
<|user|>, <|assistant|>). Inputs are `.txt` files (documents at blank lines) or `.jsonl` files
(the --text_field string); --input repeats or takes a comma-separated list of globs. BPE on a
~1 MB corpus trains in well under a second.
"""

from absl import app
from absl import flags
from absl import logging

from jaxlm import runtime
from jaxlm.data import tokenizer as tokenizer_lib

_INPUT = flags.DEFINE_multi_string("input", None, "Glob(s) of .txt/.jsonl files; comma-separated "
                                   "or repeated.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output prefix: writes OUT.model and OUT.vocab.",
                           required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Target vocabulary size (soft limit).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field holding the text.")
_SYMBOLS = flags.DEFINE_list("user_defined_symbols", [], "Extra single-token pieces, after the "
                             "chat role markers.")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer("input_sentence_size", 1_000_000,
                                            "Train on at most this many sampled lines.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    patterns = [p for arg in _INPUT.value for p in arg.split(",") if p]
    try:
        tok = tokenizer_lib.train_tokenizer(
            patterns, _OUT.value, _VOCAB_SIZE.value, user_defined_symbols=_SYMBOLS.value,
            model_type=_MODEL_TYPE.value, text_field=_TEXT_FIELD.value,
            input_sentence_size=_INPUT_SENTENCE_SIZE.value)
    except ValueError as e:  # incl. sources.DataError: the message names the file and line
        raise SystemExit(f"train_tokenizer: {e}") from None
    markers = {m: tok.piece_to_id(m) for m in tokenizer_lib.ROLE_MARKERS}
    logging.info("wrote %s: vocab_size=%d, pad/bos/eos/unk=%d/%d/%d/%d, role markers %s", tok.path,
                 tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, markers)
    print(f"wrote {tok.path} (vocab_size={tok.vocab_size})")


if __name__ == "__main__":
    runtime.run(main)
