"""Constraints: Lagrange multipliers and their update rules, CPO's trust-region step, the safety layer's action projection."""
