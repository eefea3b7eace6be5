"""One pure step function per training stage: step(state, batch) -> (state, metrics)."""
