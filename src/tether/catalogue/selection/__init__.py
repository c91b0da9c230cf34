"""Selection: which groups, samples, tokens or rollout budgets enter an update."""
