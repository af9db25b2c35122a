"""``python -m bench`` (``make bench``): run every benchmark, write bench/RESULTS.md and print it."""

import sys

from bench.run import main

sys.exit(main())
