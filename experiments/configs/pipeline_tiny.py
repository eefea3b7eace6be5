"""The whole pipeline on TinyWorld, sized for a 2-core laptop CPU.

    python -m experiments.pipeline --workdir=runs/pipeline

Measured 2026-11-28 on 2 idle CPU cores: 920 s (pretrain 234, SFT 132, preferences 36, reward
107, PPO 149, DPO 132, CAI 78, evaluate 51). DIR/report.md (and report.html, plots/*.png) shows
one row per model — base, SFT, PPO, DPO, CAI — with the gold judge's score and its parts, the
reward model's score, the KL to the SFT model, answer length and refusal rates. That run: gold
0.018 (base) → 0.536 (SFT); PPO 0.529 at 0.77 nats from SFT with a higher reward-model score and
fewer harmful red-team answers (49% → 30%); DPO 0.509; CAI 0.557 with rude or harmful red-team
answers down from 49% to 3%. The reward model (held-out accuracy 0.62 against a Bayes accuracy
of 0.80, at chance on context and arithmetic pairs: tools.reward_breakdown) is what keeps PPO
from raising the gold score.

Each stage is its own resumable run in DIR/<stage>/, started as a subprocess with its own config
file plus the flags below; rerunning the command skips finished stages and resumes the one that
was interrupted. Scale a stage with e.g. --config.pretrain.flags="--config.train.steps=2000".
"""

import ml_collections


def _stage(config: str, flags: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(config=config, flags=flags))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "data,tokenizer,pretrain,sft,preferences,reward,ppo,dpo,cai,evaluate"  # Run in this order.
    # TinyWorld sizes (jaxlm.data.tinyworld.make_all keyword arguments).
    c.data = ml_collections.ConfigDict(dict(corpus_train=20_000, corpus_valid=400, sft_train=6000, sft_valid=300,
                                            eval_per_family=24, preferences_train=2000, preferences_valid=300,
                                            rl_prompts=2000, redteam_prompts=200))
    c.tokenizer_vocab_size = 1024
    c.pretrain = _stage("experiments/configs/pretrain_tiny.py", "--config.train.steps=500 --config.train.samples=0")
    c.sft = _stage("experiments/configs/sft_tiny.py", "")
    # Preference pairs: sampled from the SFT model and labelled by the gold judge with Bradley-Terry
    # noise ('sft_samples'), TinyWorld's ready-made pairs ('tinyworld'), or both for training with the
    # sampled ones held out ('sft_samples+tinyworld'). flags: more tools.make_preferences flags.
    c.preferences = ml_collections.ConfigDict(dict(source="sft_samples+tinyworld", train_prompts=1200,
                                                   valid_prompts=300, num_samples=4, pairs_per_prompt=2,
                                                   temperature=1.0, flags=""))
    # Held-out RM accuracy stops rising after ~75 steps on these pairs (tools.reward_breakdown).
    c.reward = _stage("experiments/configs/reward_tiny.py", "--config.train.steps=100 --config.train.eval_every=50 "
                      "--config.train.checkpoint_every=50")
    # 40 iterations move the policy about 1 nat from SFT: the adaptive KL controller aims there.
    c.ppo = _stage("experiments/configs/ppo_tiny.py", "--config.kl.target=1.0")
    c.dpo = _stage("experiments/configs/dpo_tiny.py", "--config.train.steps=100 --config.eval.every=0")
    c.dpo.pairs = "tinyworld"  # 'preferences': the reward model's pairs (DIR/preferences); 'tinyworld': ready-made.
    c.cai = _stage("experiments/configs/cai_tiny.py", "")
    # The final evaluation: every model answers the same held-out prompts (greedy; one sampled
    # answer each for the KL to SFT), scored by the gold judge and the reward model.
    c.evaluate = ml_collections.ConfigDict(dict(max_prompts=0, max_new_tokens=48, batch_size=64,
                                                redteam_prompts=100, examples=6))
    return c
