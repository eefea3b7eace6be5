r"""DPO of the tiny SFT model on TinyWorld preference pairs, on a laptop CPU.

    python -m experiments.pretrain --workdir=/tmp/jaxlm/pretrain
    python -m experiments.sft --workdir=/tmp/jaxlm/sft --config.init_from=/tmp/jaxlm/pretrain
    python -m tools.make_preferences ...   # pairs of the SFT model's own samples, gold-judge labelled
    python -m experiments.dpo --config=experiments/configs/dpo_tiny.py --workdir=/tmp/jaxlm/dpo \
        --config.init_from=/tmp/jaxlm/sft [--config.data.dir=PAIRS_DIR] [--config.precompute_reference=True]

Expected: about 3-4 minutes on 2 idle CPU cores for 150 steps of 32 pairs, evals included (15
minutes on a machine shared with other runs). The training loss falls from ln 2 = 0.693 (policy ==
reference) as the implicit-reward accuracy and margin rise; held-out pairs follow (accuracy ~0.6);
`eval_gold` (the gold judge on greedy answers to held-out prompts; step 0 = the SFT model) and
`eval_kl_to_reference` (nats per sampled answer) are logged at steps 0, 75 and 150. Measured with
pairs of the SFT model's own samples on RL plus red-team prompts: gold 0.528 → 0.571 at KL 3.0
(red-team 0.47 → 0.99, at the price of over-refusing harmless requests: 0.97 → 0.62); on RL
prompts alone the gold score stays where it was (0.528 → 0.529, KL 4.5). learning_rate 5e-4
degenerates (KL 33 nats, gold 0.36). TinyWorld's default perturbation pairs (ideal answers and
hand-made flaws, responses the SFT model would rarely write) are supported but off-policy for DPO.
Your own data: --config.data.train_files=... --config.data.valid_files=... (no judge then).
"""

import ml_collections

from experiments.configs import common

from jaxlm.data.tinyworld.make import DEFAULT_SIZES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init_from = ""  # SFT workdir: the initial policy (weights, model config, tokenizer).
    c.reference_from = ""  # The frozen reference. Empty: init_from (the usual DPO setting).
    c.precompute_reference = False  # True: one pass writes the reference's log-probs beside the data; no reference
    # forward pass during training (same losses).
    c.loss = ml_collections.ConfigDict(dict(
        type="sigmoid",  # sigmoid (DPO), cdpo (label-smoothed), robust (unbiased under label noise), hinge (SLiC), ipo.
        beta=0.1,  # Strength of the implicit KL to the reference (the DPO paper's default).
        label_smoothing=0.0,  # cdpo/robust: assumed rate of flipped labels.
        soft_labels=False,  # sigmoid/cdpo: train on the `label` field (P(chosen preferred), AI feedback).
        # Length-average each side's log-probs. None: by the loss, True for IPO (its margin target is per token),
        # False for the others.
        average_log_probs=ml_collections.config_dict.placeholder(bool),
        rpo_alpha=0.0,  # RPO: + alpha x the chosen response's mean token NLL per pair (0 = plain DPO).
    ))
    c.data = ml_collections.ConfigDict(dict(
        train_files="",  # Globs of preference JSONL {prompt, chosen, rejected[, label]}. Empty: TinyWorld layout.
        valid_files="",  # Held-out pairs (eval loss/accuracy). Empty with TinyWorld: preferences_valid.jsonl.
        dir="",  # TinyWorld-layout directory (make_all or tools.make_preferences output). Empty: WORKDIR/data.
        eval_prompts_file="",  # JSONL {prompt, family} for the gold judge. Empty: DIR/eval_prompts.jsonl.
        tinyworld=ml_collections.ConfigDict(dict(seed=0, **DEFAULT_SIZES)),  # make_all() arguments.
        prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", label_field="label",
        too_long="error",  # Pairs over seq_len: 'error' (file:line), 'skip' or 'truncate' (counted).
        skip_bad_records=False,
        seq_len=128,
        batch_size=32,  # Global batch in pairs (2 sequences each).
        seed=0,
    ))
    c.optim = common.optim(learning_rate=1e-4, warmup_steps=10)
    c.train = common.train(150, log_every=10, checkpoint_every=50, grad_accum=1)
    c.eval = ml_collections.ConfigDict(dict(
        every=75,  # Steps between evals; also at step 0 (the reference itself) and at the end. 0: only those two;
        # negative: never.
        judge=True,  # TinyWorld prompts: gold-judge score of greedy answers, KL to the reference on samples.
        num_prompts=160,  # Held-out prompts (a fixed seeded subset; 0 = all).
        families="",  # Comma-separated families to keep. Empty: all of the file's.
        max_new_tokens=48,
        batch_size=64,
        samples=8,  # Greedy answers written to samples.jsonl at each eval.
        seed=1234,  # Prompt subset and sampling key of every eval, so evals differ only by the policy.
    ))
    c.lora = common.lora()  # rank > 0: LoRA adapters on the frozen init_from weights (README, "LoRA")
    c.mesh = common.mesh()
    c.distributed = common.distributed()
    return c
