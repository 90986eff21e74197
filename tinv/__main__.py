"""`python -m tinv ...` is `tinv-train ...` (what `accelerate launch -m tinv` and `torchrun -m tinv` run)."""

from .commands.train import main

main()
