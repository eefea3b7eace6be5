"""Command-line tools: benchmarks, data making, tokenizer training, sampling."""
