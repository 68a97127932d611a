"""`python -m decomp_hooks.cli` (what torchrun launches) runs the same command group."""
from decomp_hooks.cli import main

main()
