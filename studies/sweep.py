"""κ × coupling phase diagram: late R, T̄ variance, valley count and loss over many systems.

Thin script around `chronomoe_dyn.studies.sweep` (its docstring has the details).

    python studies/sweep.py [--quick] [--seed N] [--out DIR] [--set KEY=VALUE ...]

is the same as `chronomoe-dyn study sweep ...`; outputs go to studies/out/sweep/.
"""

import sys

from chronomoe_dyn.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "sweep", *sys.argv[1:]]))
