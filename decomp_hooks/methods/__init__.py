"""Decomposition methods behind one contract (`Method`), found by name in a registry.

A method is a folder here (`spd/`, `apd/`) and one line in `registry.BUILTIN`; the trainer, config loading,
evaluation, export and toys ask the method object, never its name. See docs/methods/adding-a-method.md.
"""
from decomp_hooks.methods.base import Layout, Method, StepOutput
from decomp_hooks.methods.registry import get_method, method_names, register

__all__ = ["Layout", "Method", "StepOutput", "get_method", "method_names", "register"]
