"""`python -m bench <command>`: see bench/__init__.py and docs/benchmarks.md."""

import sys

from bench.cli import main

sys.exit(main())
