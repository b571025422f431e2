"""Layer speed (forward+backward vs torch.nn.BatchNorm2d) and saved-for-backward memory, with the naive MABN.

python benchmarks/layers.py            # mabn bench layers memory, plus the naive MABN of naive.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive import NaiveMABN2d  # noqa: E402

from mabn.apps import bench  # noqa: E402
from mabn.apps.cli import main  # noqa: E402

bench.EXTRA_LAYERS["naive MABN B=N"] = lambda c: NaiveMABN2d(c, window=16, warmup_iters=1, renorm_warmup_iters=1)
sys.exit(main(["bench", "layers", "memory", *sys.argv[1:]]))
