"""Reward shaping and correction applied before advantages."""
