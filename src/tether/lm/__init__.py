"""Language-model world: models and tokenizers, tasks with verifiable rewards, rollout, trainer.

Import the submodules you need (``tether.lm.model``, ``tether.lm.tasks``, ...); this package
imports nothing heavy on its own so that ``import tether.lm`` stays cheap.
"""
