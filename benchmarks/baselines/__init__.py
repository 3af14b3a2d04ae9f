"""Implementations we measure against (not ours): the original AGIFORMER v1 model."""
