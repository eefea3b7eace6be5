"""Config blocks every stage shares: model, optimizer, train cadence, mesh, distributed start.

Each `*_tiny.py` calls these with its own defaults, so a field means the same in every stage
and is documented once (README, "Binaries and flags"). Every call returns a fresh ConfigDict.
`jaxlm.runtime.validate` checks the values of the optimizer, train and size fields at start.
"""

import ml_collections


def model(**overrides) -> ml_collections.ConfigDict:
    """jaxlm.model.ModelConfig fields. vocab_size=0: the tokenizer's size rounded up to 128."""
    return ml_collections.ConfigDict(dict(
        vocab_size=0, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=0, mlp_dim=0,
        max_seq_len=512, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True, qkv_bias=False,
        init_std=0.02, dtype="float32", remat="none", scan_unroll=4, attention_impl="xla", logits_chunk=0,
        attention_chunk=0, **overrides))


def optim(learning_rate: float, warmup_steps: int, weight_decay: float = 0.0, **overrides) -> ml_collections.ConfigDict:
    """AdamW with linear warm-up then cosine decay to min_learning_rate_ratio × lr (jaxlm.optim)."""
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, warmup_steps=warmup_steps, min_learning_rate_ratio=0.1, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=weight_decay, grad_clip=1.0, **overrides))


def train(steps: int, *, log_every: int, checkpoint_every: int, keep_checkpoints: int = 2, **fields
          ) -> ml_collections.ConfigDict:
    """The loop's cadence (jaxlm.loop.Cadence) plus the stage's own training fields (`fields`)."""
    return ml_collections.ConfigDict(dict(
        steps=steps, seed=0, log_every=log_every, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, **fields,
        crash_after_step=0,  # Testing only: SIGKILL the run right after this step (0 = never).
        sigterm_after_step=0,  # Testing only: SIGTERM to this process after this step (0 = never).
    ))


def mesh() -> ml_collections.ConfigDict:
    """Mesh axis sizes; one may be -1 (the rest). Default: every device data-parallel."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def distributed() -> ml_collections.ConfigDict:
    """Explicit multi-process start (README, "Scaling out"); empty: detected, or one process."""
    return ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))


def lora() -> ml_collections.ConfigDict:
    """LoRA adapters on a frozen base (jaxlm.lora); rank 0 = full fine-tuning. targets: any of
    q,k,v,o,gate,up,down. The base is the stage's init_from (policy_from in PPO). adapter: a peft
    adapter directory to start from (its r, alpha and targets replace rank, alpha and targets).
    base_dtype: how the frozen base is stored (bfloat16 halves it; the adapters stay float32).
    train_embeddings: also train the embeddings (and an untied head) in full, from the base's."""
    return ml_collections.ConfigDict(dict(rank=0, alpha=32.0, dropout=0.0, targets="q,k,v,o,gate,up,down",
                                          adapter="", base_dtype="float32", train_embeddings=False))
