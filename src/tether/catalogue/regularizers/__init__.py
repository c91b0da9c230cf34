"""Regularizers: KL estimators, entropy terms and divergences added to a policy loss."""
