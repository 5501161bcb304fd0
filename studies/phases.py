"""Do the seed's three training phases and healthy ranges appear under the cosine κ schedule?

Thin script around `chronomoe_dyn.studies.phases` (its docstring has the details).

    python studies/phases.py [--quick] [--seed N] [--out DIR] [--set KEY=VALUE ...]

is the same as `chronomoe-dyn study phases ...`; outputs go to studies/out/phases/.
"""

import sys

from chronomoe_dyn.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "phases", *sys.argv[1:]]))
