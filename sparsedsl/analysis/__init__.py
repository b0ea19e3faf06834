"""Analyses of patterns: exact counts of what they allow and compute."""
