"""Pretrain a ~1M-parameter Llama-style model on built-in TinyWorld text, on a laptop CPU.

    python -m experiments.pretrain --config=experiments/configs/pretrain_tiny.py --workdir=/tmp/jaxlm/pretrain

Expected: on 2 CPU cores about 3 minutes for 600 steps; the training loss falls from ~7 (log of
the vocabulary) to under 2, far below the unigram entropy of the corpus. Point it at your own
text with --config.data.train_files='data/*.txt' (and --config.data.valid_files=...).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # jaxlm.model.ModelConfig fields. vocab_size=0: the tokenizer's size rounded up to 128.
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=0, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=0, mlp_dim=0,
        max_seq_len=512, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True, qkv_bias=False,
        init_std=0.02, dtype="float32", remat="none", scan_unroll=4, attention_impl="xla"))
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
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=50, min_learning_rate_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, grad_clip=1.0))
    c.train = ml_collections.ConfigDict(dict(
        steps=600, grad_accum=1, seed=0, log_every=25, eval_every=200, eval_batches=8,
        checkpoint_every=200, keep_checkpoints=3, samples=3,
        crash_after_step=0,  # Testing only: SIGKILL the run right after this step (0 = never).
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c
