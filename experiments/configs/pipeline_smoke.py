"""The whole pipeline at toy sizes: every stage and the report in about two minutes on 2 CPU cores.

    python -m experiments.pipeline --workdir=/tmp/jaxlm_smoke --config=experiments/configs/pipeline_smoke.py

For checking that the stages fit together (the test suite runs it: tests/test_pipeline.py), not
for results: a 2-layer, 32-wide model trained for a handful of steps on a few hundred documents
scores near zero everywhere. `pipeline_tiny.py` is the configuration that shows each stage's effect.
"""

import ml_collections

from experiments.configs import pipeline_tiny

_MODEL = ("--config.model.num_layers=2 --config.model.d_model=32 --config.model.num_heads=2 "
          "--config.model.num_kv_heads=1 --config.model.scan_unroll=2 --config.model.max_seq_len=256")


def get_config() -> ml_collections.ConfigDict:
    c = pipeline_tiny.get_config()
    c.data = ml_collections.ConfigDict(dict(corpus_train=300, corpus_valid=20, sft_train=120, sft_valid=16,
                                            eval_per_family=2, preferences_train=40, preferences_valid=16,
                                            rl_prompts=64, redteam_prompts=16, reasoning_prompts=32))
    c.tokenizer_vocab_size = 512
    c.pretrain.flags = (f"{_MODEL} --config.train.steps=150 --config.train.samples=0 --config.data.batch_size=8 "
                        "--config.data.seq_len=128 --config.train.eval_every=150 --config.train.eval_batches=1 "
                        "--config.train.checkpoint_every=150 --config.train.log_every=50 --config.optim.warmup_steps=10")
    c.sft.flags = ("--config.train.steps=150 --config.data.batch_size=8 --config.data.too_long=skip "
                   "--config.optim.learning_rate=3e-3 --config.optim.warmup_steps=10 --config.train.eval_every=150 "
                   "--config.train.eval_batches=1 --config.train.checkpoint_every=150 --config.train.log_every=50 "
                   "--config.train.samples=2 --config.eval.max_prompts=8 --config.eval.max_new_tokens=24 "
                   "--config.eval.batch_size=8")
    c.preferences.source = "tinyworld"  # Sampled pairs from so weak a model are mostly ties: too few to train on.
    c.reward.flags = ("--config.train.steps=4 --config.data.batch_size=4 --config.data.seq_len=128 "
                      "--config.data.too_long=skip --config.train.eval_every=4 --config.train.checkpoint_every=4 "
                      "--config.train.log_every=2 --config.optim.warmup_steps=1 --config.normalize.num_samples=16 "
                      "--config.normalize.batch_size=16 --config.normalize.max_new_tokens=8")
    c.ppo.flags = ("--config.rollout.batch_size=8 --config.rollout.max_new_tokens=8 --config.ppo.minibatch_size=4 "
                   "--config.ppo.epochs=1 --config.train.iterations=3 --config.train.checkpoint_every=3 "
                   "--config.train.sample_every=3 --config.eval.every=3 --config.eval.num_prompts=8 "
                   "--config.policy_optim.warmup_steps=1 --config.critic_optim.warmup_steps=1")
    c.grpo.flags = ("--config.rollout.prompts=4 --config.rollout.group_size=4 --config.rollout.max_new_tokens=8 "
                    "--config.grpo.minibatch_size=8 --config.train.iterations=2 --config.train.checkpoint_every=2 "
                    "--config.train.sample_every=2 --config.eval.every=2 --config.eval.num_prompts=8 "
                    "--config.eval.batch_size=8 --config.optim.warmup_steps=1")
    c.dpo.flags = ("--config.data.batch_size=4 --config.data.seq_len=128 --config.data.too_long=skip "
                   "--config.train.steps=4 --config.train.checkpoint_every=4 --config.train.log_every=2 "
                   "--config.eval.every=0 --config.eval.num_prompts=8 --config.eval.batch_size=8 "
                   "--config.eval.max_new_tokens=8 --config.optim.warmup_steps=1")
    c.cai.flags = ("--config.sl.num_prompts=16 --config.sl.max_new_tokens=32 --config.sl.batch_size=8 "
                   "--config.train.steps=4 --config.train.batch_size=4 "
                   "--config.train.checkpoint_every=4 --config.train.log_every=2 --config.optim.warmup_steps=1 "
                   "--config.eval.max_new_tokens=8 --config.eval.batch_size=8")
    c.evaluate = ml_collections.ConfigDict(dict(max_prompts=8, max_new_tokens=8, batch_size=8, num_samples=2,
                                                redteam_prompts=8, examples=2))
    return c
