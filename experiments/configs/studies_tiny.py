"""The textbook's claims, measured on the tiny pipeline: every study, within an hour on 2 idle CPU cores.

    python -m experiments.studies --workdir=runs/studies --pipeline_dir=runs/pipeline

`--pipeline_dir` is a finished `experiments.pipeline` run (pipeline_tiny.py); without it that
pipeline runs first into DIR/pipeline (another ~15 minutes). Writes DIR/studies.md (a claim, a
measured sentence and a verdict per study) and DIR/plots/<study>.png; every run it trains lives
in DIR/runs/<run>/<stage>/, started from the pipeline's own run of that stage (from_run.py).
New runs: 4 PPO (~2.5 min each), 3 DPO, 1 pretraining + SFT on the facts split, 4 pretraining
runs at other sizes and budgets, 3 reward models; the measured figures are in BUILD_NOTES.md.
"""

import ml_collections

_SIZES = {  # model shape flags on top of the pipeline's pretraining config; "" = the pipeline's own model
    "small": "--config.model.num_layers=2 --config.model.d_model=32 --config.model.num_heads=2 "
             "--config.model.num_kv_heads=1",
    "medium": "--config.model.num_layers=3 --config.model.d_model=64 --config.model.num_heads=4 "
              "--config.model.num_kv_heads=2",
    "pipeline": "",
}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.studies = "kl,dpo,facts,scale,reward,clip"  # Run in this order; a finished one (DIR/<study>/DONE) is skipped.
    # Used only without --pipeline_dir: this pipeline (its stages data..dpo) runs into DIR/pipeline first.
    c.pipeline = ml_collections.ConfigDict(dict(config="experiments/configs/pipeline_tiny.py", flags=""))
    c.cpu_devices = 2  # As the pipeline's: each run sees the host CPU as this many devices.
    c.last = 5  # "Final" training figures: mean ± s.e. over the last this many iterations' batches.
    # Policies (PPO, DPO, SFT) answer the pipeline's held-out eval prompts: greedy + num_samples at T = 1.
    c.eval = ml_collections.ConfigDict(dict(max_prompts=0, num_samples=4, max_new_tokens=48, batch_size=64))
    # kl: PPO at β = 0 and at this fixed β, against the pipeline's PPO run (adaptive β); flags: more PPO flags.
    c.kl = ml_collections.ConfigDict(dict(fixed_beta=0.1, flags=""))
    # clip: clip ε = 0.2 against no clipping (ε = off_eps), both at this policy learning rate (the pipeline's ×10,
    # where clipping has something to stop).
    c.clip = ml_collections.ConfigDict(dict(learning_rate=3e-4, off_eps=1e6, flags=""))
    # dpo: DPO from SFT on the reward model's own pairs (PIPELINE/preferences) at each β; main_beta is compared
    # with the pipeline's PPO (fixed in advance, not the best of the runs).
    c.dpo = ml_collections.ConfigDict(dict(betas="0.1,0.5,2.0", main_beta=0.5, flags=""))
    # facts: pretraining on the filtered corpus (pipeline's pretraining config) and SFT on the pipeline's
    # demonstrations + fact questions, each repeated `repeats` times.
    c.facts = ml_collections.ConfigDict(dict(repeats=4, pretrain_flags="", sft_flags=""))
    # scale: every size × every pre-training budget (steps; "pipeline" = the pipeline's); the pipeline's own
    # size at its own steps is the pipeline's run. num_items: in-context cloze items.
    c.scale = ml_collections.ConfigDict(dict(sizes=_SIZES, steps="105,pipeline", num_items=400, flags=""))
    # reward: a reward model (the pipeline's reward config, normalised on the pairs) from each of these
    # scale runs ("size:steps"), scored on the pipeline's held-out pairs.
    c.reward = ml_collections.ConfigDict(dict(inits="small:pipeline;pipeline:105;pipeline:pipeline", flags=""))
    return c
