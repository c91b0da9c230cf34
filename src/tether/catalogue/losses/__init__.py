"""Policy losses: per-token surrogates on log-probs, one file per family."""
