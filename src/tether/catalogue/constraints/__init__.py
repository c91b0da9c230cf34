"""Constraints: Lagrange multipliers and their update rules."""
