"""ResNet-50 training step, MABN at normalization batch 2 (+/- weight centralization) vs BN, eager and compiled.

python benchmarks/model.py             # same as: mabn bench model centralization
"""

import sys

from mabn.apps.cli import main

sys.exit(main(["bench", "model", "centralization", *sys.argv[1:]]))
