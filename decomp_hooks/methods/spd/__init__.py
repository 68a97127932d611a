"""Stochastic Parameter Decomposition: rank-one components with causal-importance functions (docs/methods/spd.md)."""
