"""Every stage starts from a Hugging Face checkpoint (`hf:DIR`) and follows its chat template.

One tiny random Llama saved by `transformers`, with a byte-level BPE tokenizer.json whose ChatML
template closes assistant turns with `<|im_end|>` while its EOS is `</s>` (as base checkpoints
do), then, in as few processes as possible:

- in process: the template's tokens and loss masks (suffix of the generation prompt through
  `<|im_end|>`, nothing after it), stop ids, errors for templates that are not prefix-consistent,
  and sampling that stops on either stop id;
- `experiments.sft --config.init_from=hf:DIR` (3 steps): the first update has learning rate 0
  (warm-up from 0), so checkpoint 1 holds the initial params, which must equal the HF import;
  the run's tokenizer is the checkpoint's, saved in its workdir;
- `experiments.reward --config.init_from=SFT_WORKDIR` (the tokenizer travels on) and
  `experiments.dpo --config.init_from=hf:DIR` (policy and reference): first losses ln 2, finite;
- `experiments.ppo --config.policy_from=hf:DIR --config.reward_from=REWARD_WORKDIR`, one iteration;
- `tools.hf_export` of the SFT result: `transformers` loads it, same logits, same chat prompt ids.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, hf, init_source, sampling
from jaxlm.data import chat
from jaxlm.hf import HFTokenizer, load_tokenizer
from jaxlm.model import Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COLOURS = ["red", "blue", "green", "black", "white", "pink"]
THINGS = ["ball", "cup", "hat", "car"]


def _sft_records():
    records = [{"prompt": f"What colour is the {t}?", "response": f"The {t} is {c}."}
               for t in THINGS for c in COLOURS[:3]]
    records.append({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Colour of the hat?"},
                                 {"role": "assistant", "content": "Pink."},
                                 {"role": "user", "content": "And the cup?"},
                                 {"role": "assistant", "content": "White."}]})
    return records


def _preference_records():
    return [{"prompt": f"What colour is the {t}?", "chosen": f"The {t} is {c}.", "rejected": f"No idea {c}."}
            for t in THINGS for c in COLOURS[3:5]]


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random LlamaForCausalLM (d_model 32, 2 layers, GQA) + BPE tokenizer.json with a ChatML template."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("hf_llama")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    texts = [json.dumps(r) for r in _sft_records() + _preference_records()] + ["user assistant system"] * 20
    tok.train_from_iterator(texts * 5, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False, "chat_template": CHATML}))
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tok(hf_dir):
    return load_tokenizer(str(hf_dir))


# --- The chat template in jaxlm.data.chat (in process) ---------------------------------------------


def test_template_tokens_mask_and_stop_ids(tok):
    im_start, im_end = tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")
    assert isinstance(tok, HFTokenizer) and chat.has_chat_template(tok)
    assert tok.eos_id == tok.piece_to_id("</s>") != im_end
    assert chat.stop_ids(tok) == (tok.eos_id, im_end)  # EOS + the template's end of turn

    prompt, response = "What colour is the cup?", "The cup is red."
    tokens, mask = chat.encode_example(tok, prompt, response)
    prompt_ids = chat.encode_prompt(tok, prompt)
    assert prompt_ids == tok.encode(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    # Prompt + response + <|im_end|>; the template's trailing newline is never generated: dropped.
    assert tokens == prompt_ids + tok.encode(response) + [im_end]
    assert mask == [0] * len(prompt_ids) + [1] * (len(tokens) - len(prompt_ids))
    assert tokens.count(im_start) == 2

    # Multi-turn with a system message: both assistant turns and their <|im_end|>, nothing else.
    messages = _sft_records()[-1]["messages"]
    tokens, mask = chat.encode_example(tok, messages)
    targets = [t for t, m in zip(tokens, mask) if m]
    assert targets == tok.encode("Pink.") + [im_end] + tok.encode("White.") + [im_end]
    assert tokens[:len(chat.encode_prompt(tok, messages[:2]))] == chat.encode_prompt(tok, messages[:2])

    assert chat.decode_response(tok, tok.encode("Blue.") + [im_end] + tok.encode("\nmore")) == "Blue."
    with pytest.raises(ValueError, match="special token '<\\|im_start\\|>'"):
        chat.encode_example(tok, "hi <|im_start|>system", "ok")


def test_template_that_merges_across_the_prompt_is_refused(hf_dir, tmp_path):
    """A generation prompt ending in a space: ' red' is one token in the conversation, so the
    prompt's tokens are not a prefix of it; the error names the message."""
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    spaced = load_tokenizer(str(tmp_path))
    assert len(spaced.encode(" red")) == 1 and spaced.encode("assistant: ")[-1] != spaced.encode(" red")[0]
    with pytest.raises(ValueError, match="message 1 \\(assistant\\) tokenizes differently"):
        chat.encode_example(spaced, "Colour?", "red")


def test_sampling_stops_on_any_stop_id(hf_dir):
    cfg, params, _ = hf.load_pretrained(f"hf:{hf_dir}")
    model = Model(cfg)
    prompts, lengths = sampling.prompts_to_batch([[3, 10, 11, 12], [3, 20, 21]], pad_id=0, bucket=8)
    run = lambda eos: jax.device_get(sampling.generate(model, params, prompts, lengths, max_new_tokens=6, rng=None,
                                                       greedy=True, eos_id=eos, pad_id=0))
    free = run(None)
    stops = (int(free.tokens[0, 1]), int(free.tokens[1, 3]))
    out = run(stops)
    for row in range(2):
        first = next(i for i, t in enumerate(free.tokens[row]) if t in stops)
        assert out.lengths[row] == first + 1 and out.ended[row]
        np.testing.assert_array_equal(out.tokens[row, :first + 1], free.tokens[row, :first + 1])


# --- The stage binaries from hf:DIR ------------------------------------------------------------------


def _run(module, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{module}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _metrics(workdir):
    by_step = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        m = json.loads(line)
        by_step.setdefault(m["step"], {}).update(m)
    return by_step


def test_sft_reward_dpo_ppo_from_hf_and_export(hf_dir, tok, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sft_data = _write_jsonl(tmp_path / "sft.jsonl", _sft_records())
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _preference_records())
    common = ["--config.data.seq_len=64", "--config.data.batch_size=4", "--config.train.log_every=1"]

    # SFT from hf:DIR. warmup_steps=2: the first update has learning rate 0, so checkpoint 1 = step 0.
    sft_dir = tmp_path / "sft"
    _run("experiments.sft", f"--workdir={sft_dir}", f"--config.init_from=hf:{hf_dir}",
         f"--config.data.train_files={sft_data}", "--config.train.steps=3", "--config.train.checkpoint_every=1",
         "--config.train.keep_checkpoints=3", "--config.train.eval_every=3", "--config.train.samples=0",
         "--config.optim.warmup_steps=2", *common)
    imported = hf.load_params(str(hf_dir))
    step1, meta = checkpoint.load_params(str(sft_dir), step=1)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(step1), jax.device_get(imported))
    assert meta["stage"] == "sft" and meta["init_from"] == f"hf:{hf_dir}"
    assert meta["tokenizer"] == str(sft_dir / "tokenizer") and meta["model"] == init_source.load_meta(
        f"hf:{hf_dir}")["model"]
    assert init_source.same_tokenizer(load_tokenizer(meta["tokenizer"]), tok)
    losses = [m["loss"] for s, m in sorted(_metrics(sft_dir).items()) if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    # Reward model from the SFT run (its tokenizer directory travels on), and DPO from hf:DIR.
    reward_dir, dpo_dir = tmp_path / "reward", tmp_path / "dpo"
    _run("experiments.reward", f"--workdir={reward_dir}", f"--config.init_from={sft_dir}",
         f"--config.data.train_files={pairs}", "--config.train.steps=2", "--config.train.checkpoint_every=2",
         "--config.normalize.on=data", "--config.normalize.num_samples=8", "--config.normalize.batch_size=4",
         *common)
    _run("experiments.dpo", f"--workdir={dpo_dir}", f"--config.init_from=hf:{hf_dir}",
         f"--config.data.train_files={pairs}", "--config.train.steps=2", "--config.train.checkpoint_every=2",
         "--config.eval.every=-1", *common)
    for workdir in (reward_dir, dpo_dir):
        metrics = _metrics(workdir)
        assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 2)), metrics
        # Zero reward head / policy == reference: every pair starts at exactly ln 2.
        assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-6), (workdir, metrics[1])

    # PPO: policy and reference from hf:DIR, reward model (and critic) from the reward run.
    ppo_dir = tmp_path / "ppo"
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in _preference_records()])
    _run("experiments.ppo", f"--workdir={ppo_dir}", f"--config.policy_from=hf:{hf_dir}",
         f"--config.reward_from={reward_dir}", f"--config.data.prompts_file={prompts}",
         "--config.data.max_prompt_len=48", "--config.rollout.batch_size=4", "--config.rollout.max_new_tokens=4",
         "--config.ppo.minibatch_size=4", "--config.ppo.epochs=1", "--config.train.iterations=1",
         "--config.train.checkpoint_every=1", "--config.eval.every=0")
    assert all(math.isfinite(_metrics(ppo_dir)[1][k]) for k in ("policy_loss", "value_loss", "score"))
    for workdir in (reward_dir, dpo_dir, ppo_dir):
        meta = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False).restore_meta()
        assert meta["tokenizer"] == str(workdir / "tokenizer")
        assert init_source.same_tokenizer(load_tokenizer(meta["tokenizer"]), tok)

    # Export the SFT result: transformers loads it and computes the same logits; same chat prompt ids.
    exported = tmp_path / "exported"
    _run("tools.hf_export", f"--checkpoint={sft_dir}", f"--out={exported}")
    model, params, _ = init_source.load_for_inference(str(sft_dir))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    ids = chat.encode_example(tok, "What colour is the hat?", "The hat is blue.")[0]
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()[0]
    ours = np.asarray(model.apply(params, jnp.asarray([ids], jnp.int32)).logits[0])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    messages = [{"role": "user", "content": "What colour is the hat?"}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered) == chat.encode_prompt(tok, messages)
