"""Experiments: each tests one claim of the guide with a hypothesis, a run and a measured result."""
