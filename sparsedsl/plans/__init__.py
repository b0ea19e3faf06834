"""Execution plans: the ways a compiled pattern can compute attention."""
