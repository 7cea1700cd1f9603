"""``python -m fastgpt.bench``: the same as ``fastgpt bench``."""

import sys

from fastgpt.bench.cli import main

sys.exit(main())
