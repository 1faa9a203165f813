"""`python -m diffscm.cli` (and `accelerate launch -m diffscm.cli ...`) runs the `diffscm` command."""

from . import main

main()
