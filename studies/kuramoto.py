"""Does the simulated stationary R(K) follow R = sqrt(1 − 2γ/K) for Lorentzian ω?

Thin script around `chronomoe_dyn.studies.kuramoto` (its docstring has the details).

    python studies/kuramoto.py [--quick] [--seed N] [--out DIR] [--set KEY=VALUE ...]

is the same as `chronomoe-dyn study kuramoto ...`; outputs go to studies/out/kuramoto/.
"""

import sys

from chronomoe_dyn.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "kuramoto", *sys.argv[1:]]))
