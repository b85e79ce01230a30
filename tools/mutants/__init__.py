"""python -m tools.mutants: a mutation check of the data path's tests (issue 21 item 8).

A curated list of small, plausible bugs (catalog.toml: file, exact original snippet, replacement,
the tests that must catch it) is planted one at a time in a temporary copy of the tree; each
mutant's related tests run against it; the score is the share of mutants the tests kill.
"""
__version__ = "1.0"

DEFAULT_THRESHOLD = 95.0
