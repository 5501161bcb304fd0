"""After an expert that is a valley collapses, how many ticks until its valley fills?

Thin script around `chronomoe_dyn.studies.valley_repair` (its docstring has the details).

    python studies/valley_repair.py [--quick] [--seed N] [--out DIR] [--set KEY=VALUE ...]

is the same as `chronomoe-dyn study valley-repair ...`; outputs go to studies/out/valley-repair/.
"""

import sys

from chronomoe_dyn.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "valley-repair", *sys.argv[1:]]))
