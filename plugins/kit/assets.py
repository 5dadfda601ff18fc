"""The shipped assets plugins read by default: the demo corpus, its held-out text and the
built-in evaluation suites. Paths only: reading them is the plugin's job."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
DEMO_DIR = ASSETS / "demo"
DEMO_CORPUS = DEMO_DIR / "corpus.txt"      # pre-training text of the demo model
DEMO_HELDOUT = DEMO_DIR / "heldout.txt"    # held-out text: the default perplexity set
SUITES_DIR = ASSETS / "suites"             # built-in evaluation suites, one folder each
