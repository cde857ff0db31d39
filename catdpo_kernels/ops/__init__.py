"""Autograd-level building blocks: sequence log-probs, pair terms, category reductions."""
