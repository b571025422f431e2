"""Layer speed (forward+backward vs torch.nn.BatchNorm2d) and saved-for-backward memory.

python benchmarks/layers.py            # same as: mabn bench layers memory
"""

import sys

from mabn.cli import main

sys.exit(main(["bench", "layers", "memory", *sys.argv[1:]]))
