r"""The main job: the whole life of a language model in one command, with a report.

    python -m experiments.pipeline --workdir=DIR [--config=experiments/configs/pipeline_tiny.py]

make TinyWorld data → train the tokenizer → pretrain → SFT → GRPO on the reasoning family (the
verifier's reward) → sample pairs from the SFT model and label them with the gold judge → reward
model → PPO → DPO → Constitutional AI (supervised phase) → evaluate every model on the same
held-out prompts → DIR/report.md (+ report.html, plots/).

Each training stage is its own binary, run as a subprocess in DIR/<stage>/ with its own config
file (so each can be rerun, inspected and scaled alone); a finished stage leaves DIR/<stage>/DONE.
Rerunning the pipeline skips finished stages and resumes the interrupted one from its checkpoint.

The entry point follows the binaries' rules (`jaxlm.runtime`): bad flags and bad input are one line
and exit 1; the config is checked before anything is written; DIR is locked (DIR/.lock) for the
pipeline's life; DIR/config.json, written when the first stage starts, records the settings, and a
rerun whose settings differ for a finished stage (its block, or what its output depends on:
`STAGE_SETTINGS`) stops before touching anything, saying what differs (another --workdir,
--overwrite, or deleting DIR/<stage>/ redoes it). Unfinished stages may change: each binary makes
its own rerun check.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from jaxlm import runtime

try:
    _CONFIG = config_flags.DEFINE_config_file(  # found from the package: runs from any directory
        "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline_tiny.py"),
        "Pipeline config.")
except (AttributeError, KeyError, TypeError, ValueError) as e:  # an override naming no field: one line
    runtime.exit_on_config_error(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's run and the report.", required=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What each stage's output depends on: a rerun may not change these for a finished stage.
STAGE_SETTINGS = {"data": ("seed", "data"), "tokenizer": ("tokenizer_vocab_size",), "pretrain": ("pretrain",),
                  "sft": ("sft",), "grpo": ("grpo",), "preferences": ("preferences", "seed"), "reward": ("reward",),
                  "ppo": ("ppo",), "dpo": ("dpo",), "cai": ("cai", "seed"), "evaluate": ("evaluate",)}
PREFERENCE_SOURCES = ("sft_samples", "tinyworld", "sft_samples+tinyworld")
DPO_PAIRS = ("preferences", "tinyworld")


def check_config(cfg) -> list[str]:
    """The stages to run, after checking what the pipeline reads of `cfg` (ConfigError naming the flag),
    so a typo fails at once rather than after the stages before it."""
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_SETTINGS]
    if unknown or not stages:
        raise runtime.ConfigError(f"--config.stages={cfg.stages}: unknown stage(s) {unknown}; the stages are "
                                  f"{','.join(STAGE_SETTINGS)}")
    if cfg.preferences.source not in PREFERENCE_SOURCES:
        raise runtime.ConfigError(f"--config.preferences.source={cfg.preferences.source}: expected one of "
                                  f"{', '.join(PREFERENCE_SOURCES)}")
    if cfg.dpo.pairs not in DPO_PAIRS:
        raise runtime.ConfigError(f"--config.dpo.pairs={cfg.dpo.pairs}: expected one of {', '.join(DPO_PAIRS)}")
    for key, low in (("cpu_devices", 0), ("tokenizer_vocab_size", 1)):
        if cfg.get(key, low) < low:
            raise runtime.ConfigError(f"--config.{key}={cfg[key]}: must be >= {low}")
    for stage in stages:
        block = cfg.get(stage)
        if block is None or not isinstance(block.get("flags"), str):
            continue
        try:
            shlex.split(block.flags)
        except ValueError as e:
            raise runtime.ConfigError(f"--config.{stage}.flags={block.flags}: {e}") from None
        if "config" in block and not os.path.isfile(os.path.join(ROOT, block.config)):
            raise runtime.ConfigError(f"--config.{stage}.config={block.config}: no such file (relative to {ROOT})")
    return stages


class Pipeline:
    def __init__(self, cfg, workdir: str):
        self.cfg, self.dir = cfg, os.path.abspath(workdir)
        self.stages = check_config(cfg)
        self.start = time.perf_counter()

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def data_dir(self) -> str:
        return self.path("data")

    # ---------------------------------------------------------------------------------------------
    # Running stages

    def run(self):
        timings = self._read_timings()
        started = False
        for i, name in enumerate(self.stages, 1):
            done = self.path(name, "DONE")
            header = f"[{i}/{len(self.stages)}] {name}"
            if os.path.exists(done):
                print(f"{header}: done earlier ({timings.get(name, 0):.0f}s), skipped", flush=True)
                continue
            if not started:  # Not before: a command that fails its checks leaves the old one.
                self._write_config()
                started = True
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

    # ---------------------------------------------------------------------------------------------
    # The workdir: lock, rerun check, config.json

    def open_workdir(self, overwrite: bool):
        """Create and lock DIR; with `overwrite`, move a run already there aside (DIR.replaced-TIME);
        else stop if a finished stage's settings differ from this command's (see the module docstring)."""
        os.makedirs(self.dir, exist_ok=True)
        runtime.lock_workdir(self.dir)
        if overwrite and any(n != runtime.LOCK_FILE for n in os.listdir(self.dir)):
            moved = runtime.move_aside(self.dir)
            print(f"--overwrite: the pipeline that was in {self.dir} is now in {moved}; starting a new one", flush=True)
            return
        differences = self.rerun_differences()
        if differences:
            raise runtime.ConfigError(
                f"{self.dir} holds a pipeline whose finished stages were made with other settings than this "
                "command:\n  " + "\n  ".join(differences) + "\nNothing was changed. To start a new pipeline, use "
                f"another --workdir, or add --overwrite to move this one aside (to {self.dir}.replaced-TIME); to "
                f"redo one stage with the new settings, delete {self.dir}/<stage>/ (and the stages after it that "
                "read it) and rerun.")

    def rerun_differences(self) -> list[str]:
        """Settings of finished stages (DIR/<stage>/DONE) in DIR/config.json that this command changes."""
        try:
            with open(self.path("config.json")) as f:
                stored = json.load(f)
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path('config.json')}: not valid JSON ({e.msg}); move it away to rerun "
                             "without the check") from None
        now = json.loads(json.dumps(self.cfg.to_dict(), default=str))
        out = []
        for stage, keys in STAGE_SETTINGS.items():
            if not os.path.exists(self.path(stage, "DONE")):
                continue
            for key in keys:
                if key not in stored or key not in now:
                    continue
                for flag, old, new in _changed(key, stored[key], now[key]):
                    line = f"--config.{flag} (stage {stage} is finished): the run has {old!r}, this command {new!r}"
                    if line not in out:
                        out.append(line)
        return out

    def _write_config(self):
        path = self.path("config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.cfg.to_dict(), f, indent=2, default=str)
        os.replace(path + ".tmp", path)

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
        pairs = {"preferences": self.path("preferences"), "tinyworld": self.data_dir}[self.cfg.dpo.pairs]
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


def _changed(flag: str, old, new):
    """(flag, old, new) for each leaf of two config values that differ (a field only one of them has,
    e.g. one the code added since, is not a difference)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) & set(new)):
            yield from _changed(f"{flag}.{key}", old[key], new[key])
    elif old != new:
        yield flag, old, new


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint it reads at INFO.
        logging.set_verbosity(logging.WARNING)
    pipeline = Pipeline(_CONFIG.value, _WORKDIR.value)
    pipeline.open_workdir(flags.FLAGS["overwrite"].value)
    pipeline.run()


if __name__ == "__main__":
    runtime.run(main)
