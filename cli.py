"""Train and evaluate eqlightning models: ``python cli.py fit --config configs/quickstart.yaml``.

Same entry point as the ``eqlightning`` console script; see ``python cli.py --help`` and README.md.
"""

import sys

from eqlightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
