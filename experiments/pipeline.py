r"""The main job: the whole life of a language model in one command, with a report.

    python -m experiments.pipeline --workdir=DIR [--config=experiments/configs/pipeline_tiny.py]

make TinyWorld data → train the tokenizer → pretrain → SFT → GRPO on the reasoning family (the
verifier's reward) → sample pairs from the SFT model and label them with the gold judge → reward
model → PPO → DPO → Constitutional AI (supervised phase) → evaluate every model on the same
held-out prompts → DIR/report.md (+ report.html, plots/).

Each training stage is its own binary, run as a subprocess in DIR/<stage>/ with its own config
file (so each can be rerun, inspected and scaled alone); a finished stage leaves DIR/<stage>/DONE.
Rerunning the pipeline skips finished stages and resumes the interrupted one from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(  # found from the package: runs from any directory
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline_tiny.py"),
    "Pipeline config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's run and the report.", required=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Pipeline:
    def __init__(self, cfg, workdir: str):
        self.cfg, self.dir = cfg, os.path.abspath(workdir)
        self.stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
        unknown = [s for s in self.stages if not hasattr(self, "stage_" + s)]
        if unknown:
            raise app.UsageError(f"--config.stages: unknown stage(s) {unknown}")
        self.start = time.perf_counter()

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def data_dir(self) -> str:
        return self.path("data")

    # ---------------------------------------------------------------------------------------------
    # Running stages

    def run(self):
        os.makedirs(self.dir, exist_ok=True)
        timings = self._read_timings()
        for i, name in enumerate(self.stages, 1):
            done = self.path(name, "DONE")
            header = f"[{i}/{len(self.stages)}] {name}"
            if os.path.exists(done):
                print(f"{header}: done earlier ({timings.get(name, 0):.0f}s), skipped", flush=True)
                continue
            elapsed = time.perf_counter() - self.start
            print(f"\n{'=' * 80}\n{header}   (pipeline time so far {elapsed / 60:.1f} min)\n{'=' * 80}", flush=True)
            t0 = time.perf_counter()
            getattr(self, "stage_" + name)()
            seconds = time.perf_counter() - t0  # Of this invocation only, when the stage was resumed.
            timings[name] = seconds
            self._write_timings(timings)
            os.makedirs(self.path(name), exist_ok=True)
            with open(done, "w") as f:
                json.dump({"seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            print(f"{header}: finished in {seconds:.0f}s", flush=True)
        report = self.path("report.md")
        print("\nPipeline finished. " + (f"Report: {report}" if os.path.exists(report) else
                                          "No report yet: it is written by the 'evaluate' stage."), flush=True)

    def _read_timings(self) -> dict:
        try:
            with open(self.path("timings.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _write_timings(self, timings: dict):
        with open(self.path("timings.json"), "w") as f:
            json.dump(timings, f, indent=2)

    def child_env(self) -> dict[str, str]:
        """The stage subprocesses' environment: with `cpu_devices` > 1, XLA splits the host CPU into
        that many devices, so each stage's data-parallel mesh (data=-1) runs a shard of every batch
        per core. Only the host platform is affected: on a GPU or TPU machine the flag changes nothing."""
        env = dict(os.environ)
        n = self.cfg.get("cpu_devices", 0)
        if n and n > 1 and "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        return env

    def binary(self, module: str, workdir: str, config: str, *flags: str, extra: str = ""):
        """Run one stage binary as a subprocess; its progress bar goes straight to the terminal."""
        cmd = [sys.executable, "-m", module, f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}",
               *flags, *shlex.split(extra)]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        result = subprocess.run(cmd, cwd=ROOT, env=self.child_env())
        if result.returncode != 0:
            raise SystemExit(f"stage {module} failed (exit code {result.returncode}); fix the cause and rerun the "
                             f"same pipeline command: finished stages are skipped and this one resumes.")

    # ---------------------------------------------------------------------------------------------
    # The stages, in pipeline order

    def stage_data(self):
        from jaxlm.data.tinyworld import make_all
        make_all(self.data_dir, seed=self.cfg.seed, **self.cfg.data.to_dict())

    def stage_tokenizer(self):
        from jaxlm.data.chat import REASONING_MARKERS
        from jaxlm.data.tokenizer import train_tokenizer
        # <think> and </think> as single tokens: the reasoning family's block costs 2 tokens, not 15 bytes.
        tok = train_tokenizer([os.path.join(self.data_dir, "corpus_train.jsonl")], self.path("tokenizer", "tokenizer"),
                              self.cfg.tokenizer_vocab_size, user_defined_symbols=REASONING_MARKERS)
        print(f"tokenizer: {tok.vocab_size} pieces -> {self.path('tokenizer', 'tokenizer.model')}")

    def stage_pretrain(self):
        self.binary("experiments.pretrain", self.path("pretrain"), self.cfg.pretrain.config,
                    f"--config.data.train_files={self.data_dir}/corpus_train.jsonl",
                    f"--config.data.valid_files={self.data_dir}/corpus_valid.jsonl",
                    f"--config.data.tokenizer={self.path('tokenizer', 'tokenizer.model')}",
                    extra=self.cfg.pretrain.flags)

    def stage_sft(self):
        self.binary("experiments.sft", self.path("sft"), self.cfg.sft.config, f"--config.init_from={self.path('pretrain')}",
                    f"--config.data.dir={self.data_dir}", extra=self.cfg.sft.flags)

    def stage_preferences(self):
        """Preference pairs for the reward model and DPO, in DIR/preferences/.

        source='sft_samples' (as in InstructGPT): the SFT model answers each prompt
        several times and the gold judge, with Bradley-Terry rater noise, labels pairs of its own
        answers, so the reward model learns to rank what PPO will show it. source='tinyworld':
        TinyWorld's ready-made pairs (reference answers against hand-made flaws), like a static
        human-preference dataset; a model too weak to finish its answers (the smoke config's) can
        still be taken through every later stage. 'sft_samples+tinyworld' (pipeline_tiny's default):
        both kinds for training, the sampled pairs alone held out (summary.json counts both).
        """
        p, out = self.cfg.preferences, self.path("preferences")
        sources = ("sft_samples", "tinyworld", "sft_samples+tinyworld")
        if p.source not in sources:
            raise app.UsageError(f"--config.preferences.source={p.source!r}: expected one of {sources}")
        if p.source == "tinyworld":
            os.makedirs(out, exist_ok=True)
            for name in ("preferences_train.jsonl", "preferences_valid.jsonl", "rl_prompts.jsonl"):
                shutil.copyfile(os.path.join(self.data_dir, name), os.path.join(out, name))
            with open(os.path.join(self.data_dir, "summary.json")) as f:
                data_summary = json.load(f)  # Its `preferences` section: counts and the labels' Bayes accuracy.
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump({"source": "tinyworld", "data_dir": self.data_dir,
                           "preferences": data_summary.get("preferences", {})}, f, indent=2)
            print(f"TinyWorld's preference pairs -> {out}", flush=True)
            return
        cmd = [sys.executable, "-m", "tools.make_preferences", f"--checkpoint={self.path('sft')}",
               f"--data_dir={self.data_dir}", f"--out_dir={out}",
               f"--train_prompts={p.train_prompts}", f"--valid_prompts={p.valid_prompts}",
               f"--num_samples={p.num_samples}", f"--pairs_per_prompt={p.pairs_per_prompt}",
               f"--temperature={p.temperature}", f"--seed={self.cfg.seed}", *shlex.split(p.flags)]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=self.child_env()).returncode != 0:
            raise SystemExit("stage preferences failed; rerun the same pipeline command after fixing the cause")
        if p.source == "sft_samples+tinyworld":  # Training pairs of both kinds; held out: the sampled ones only.
            train = os.path.join(out, "preferences_train.jsonl")
            with open(train) as f:
                sampled = f.read()
            with open(os.path.join(self.data_dir, "preferences_train.jsonl")) as f:
                builtin = f.read()
            with open(train + ".tmp", "w") as f:
                f.write(sampled + builtin)
            os.replace(train + ".tmp", train)
            summary_path = os.path.join(out, "summary.json")
            with open(summary_path) as f:
                summary = json.load(f)
            summary["source"] = p.source
            summary["tinyworld_train_pairs"] = builtin.count("\n")
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=2)
            print(f"+ {builtin.count(chr(10))} TinyWorld pairs -> {train}", flush=True)

    def stage_reward(self):
        self.binary("experiments.reward", self.path("reward"), self.cfg.reward.config,
                    f"--config.init_from={self.path('sft')}", f"--config.data.dir={self.path('preferences')}",
                    extra=self.cfg.reward.flags)

    def stage_ppo(self):
        self.binary("experiments.ppo", self.path("ppo"), self.cfg.ppo.config, f"--config.policy_from={self.path('sft')}",
                    f"--config.reward_from={self.path('reward')}", f"--config.data.dir={self.data_dir}",
                    extra=self.cfg.ppo.flags)

    def stage_grpo(self):
        """GRPO from the SFT model on TinyWorld's reasoning prompts, rewarded by the verifier."""
        self.binary("experiments.grpo", self.path("grpo"), self.cfg.grpo.config, f"--config.policy_from={self.path('sft')}",
                    f"--config.data.dir={self.data_dir}", extra=self.cfg.grpo.flags)

    def stage_dpo(self):
        """DPO from the SFT model on `dpo.pairs`: 'preferences' (the reward model's pairs) or
        'tinyworld' (TinyWorld's ready-made pairs: clear gaps between a reference answer and a
        flawed one, where the sampled pairs' small gaps make noisy labels)."""
        pairs = {"preferences": self.path("preferences"), "tinyworld": self.data_dir}.get(self.cfg.dpo.pairs)
        if pairs is None:
            raise app.UsageError(f"--config.dpo.pairs={self.cfg.dpo.pairs!r}: expected 'preferences' or 'tinyworld'")
        self.binary("experiments.dpo", self.path("dpo"), self.cfg.dpo.config, f"--config.init_from={self.path('sft')}",
                    f"--config.data.dir={pairs}",
                    f"--config.data.eval_prompts_file={self.data_dir}/eval_prompts.jsonl", extra=self.cfg.dpo.flags)

    def stage_cai(self):
        """Constitutional AI's critique → revision fine-tuning on red-team prompts and, with
        `cai.harmful_prompts` > 0, that many training-side harmful requests from rl_prompts.jsonl
        (DIR/cai_prompts.jsonl): revising only rude red-team answers leaves the harmful
        compliance the SFT data teaches untouched (greedy refusals of harmful requests fell to 0.83)."""
        n = self.cfg.cai.get("harmful_prompts", 0)
        prompts = [f"--config.data.prompts_file={self._cai_prompts_file(n)}"] if n else []
        self.binary("experiments.cai", self.path("cai"), self.cfg.cai.config, f"--config.init_from={self.path('sft')}",
                    f"--config.data.dir={self.data_dir}", *prompts, extra=self.cfg.cai.flags)

    def _cai_prompts_file(self, num_harmful: int) -> str:
        """DIR/cai_prompts.jsonl: every red-team prompt plus the first `num_harmful` harmful requests
        of rl_prompts.jsonl (both training-side), shuffled with the pipeline's seed."""
        import random

        from jaxlm.data.tinyworld.corpus import write_jsonl

        def read(name: str) -> list[dict]:
            with open(os.path.join(self.data_dir, name)) as f:
                return [json.loads(line) for line in f if line.strip()]

        harmful = [{"prompt": r["prompt"]} for r in read("rl_prompts.jsonl") if r.get("family") == "harmful"]
        records = [{"prompt": r["prompt"]} for r in read("redteam_prompts.jsonl")] + harmful[:num_harmful]
        random.Random(self.cfg.seed).shuffle(records)
        path = self.path("cai_prompts.jsonl")
        write_jsonl(path, records)
        print(f"CAI prompts: red-team + {min(num_harmful, len(harmful))} harmful requests -> {path}", flush=True)
        return path

    def stage_evaluate(self):
        from experiments import report
        report.evaluate_and_report(self.dir, self.data_dir, self.cfg.evaluate, self._read_timings())


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint it reads at INFO.
        logging.set_verbosity(logging.WARNING)
    Pipeline(_CONFIG.value, _WORKDIR.value).run()


if __name__ == "__main__":
    app.run(main)
