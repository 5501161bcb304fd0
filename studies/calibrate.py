"""Which one set of v2 constants? Candidates from a compare arms file, in the simulator.

Thin script around `chronomoe_dyn.studies.calibrate` (its docstring has the details).

    python studies/calibrate.py [--quick] [--seed N] [--out DIR] [--set KEY=VALUE ...]

is the same as `chronomoe-dyn study calibrate ...`; outputs go to studies/out/calibrate/.
"""

import sys

from chronomoe_dyn.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "calibrate", *sys.argv[1:]]))
