"""Pretrain a ~1M-parameter Llama-style model on built-in TinyWorld text, on a laptop CPU.

    python -m experiments.pretrain --config=experiments/configs/pretrain_tiny.py --workdir=/tmp/jaxlm/pretrain

Expected: on 2 CPU cores about 3 minutes for 600 steps; the training loss falls from ~7 (log of
the vocabulary) to under 2, far below the unigram entropy of the corpus. Point it at your own
text with --config.data.train_files='data/*.txt' (and --config.data.valid_files=...).
"""

import ml_collections

from experiments.configs import common


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # jaxlm.model.ModelConfig fields. vocab_size=0: the tokenizer's size rounded up to 128.
    c.model = common.model()
    c.data = ml_collections.ConfigDict(dict(
        train_files="",  # Globs, comma-separated. Empty: generate TinyWorld text into WORKDIR/data.
        valid_files="",  # Empty with built-in data: TinyWorld's held-out split; else no eval.
        text_field="text",  # JSONL field holding each document.
        txt_mode="paragraphs",  # .txt files: one document per blank-line-separated paragraph, or 'file'.
        skip_bad_records=False,  # True: skip unreadable/invalid records and report how many.
        tokenizer="",  # A SentencePiece .model. Empty: train one on train_files into WORKDIR.
        tokenizer_vocab_size=1024,
        seq_len=128,
        batch_size=32,  # Global batch (rows); split evenly over processes.
        builtin_docs=20_000,  # Size of the generated TinyWorld corpus.
        seed=0,
    ))
    c.optim = common.optim(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1)
    c.train = common.train(600, log_every=25, checkpoint_every=200, keep_checkpoints=3, eval_every=200,
                           eval_batches=8, grad_accum=1,
                           samples=3)  # Unconditional samples written to samples.txt at the end.
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c
