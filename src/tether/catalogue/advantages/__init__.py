"""Advantage estimators: rewards (and values, log-probs) to per-token advantages."""
