"""Regenerate bench/results/README.md from bench/results/<device>/*.json.

Usage: python bench/results/summarize.py [RESULTS_DIR] [--check]
(the logic lives in llmkit.bench.summary, where it is tested).
"""

import sys

from llmkit.bench.summary import main

if __name__ == "__main__":
    sys.exit(main())
