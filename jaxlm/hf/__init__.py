"""Hugging Face interop, one package: Llama, Mistral and Qwen2 checkpoints in and out of jaxlm.

- `config`: config.json <-> `ModelConfig`, and what is refused (`UnsupportedCheckpointError`);
- `weights`: weight layouts, the sharded safetensors reader, `load_pretrained`, `save_pretrained`;
- `tokenizer`: a Hugging Face tokenizer and chat template behind jaxlm's tokenizer interface, and
  `load_tokenizer`, which reads either kind (a jaxlm SentencePiece `.model` or an HF directory).

Stages start from a Hugging Face directory through `jaxlm.init_source` (`--config.init_from=hf:PATH`).
"""

from jaxlm.hf.config import (OVERRIDABLE, ROPE_TYPES, SCORE_BIAS_KEY, SUPPORTED_MODEL_TYPES,
                             UnsupportedCheckpointError, hf_config_from_model, model_config_from_hf, read_hf_config,
                             rope_parameters, strip_prefix)
from jaxlm.hf.tokenizer import HFTokenizer, is_hf_tokenizer_path, load_tokenizer
from jaxlm.hf.weights import (JAXLM_CHAT_TEMPLATE, SafetensorsDir, hf_tensors, load_params, load_pretrained,
                              load_reward_model, save_pretrained, write_tokenizer)

__all__ = ["OVERRIDABLE", "ROPE_TYPES", "SCORE_BIAS_KEY", "SUPPORTED_MODEL_TYPES", "UnsupportedCheckpointError",
           "hf_config_from_model", "model_config_from_hf", "read_hf_config", "rope_parameters", "strip_prefix",
           "HFTokenizer", "is_hf_tokenizer_path", "load_tokenizer", "JAXLM_CHAT_TEMPLATE", "SafetensorsDir",
           "hf_tensors", "load_params", "load_pretrained", "load_reward_model", "save_pretrained", "write_tokenizer"]
