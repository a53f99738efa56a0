"""``python -m qsearch``: the same command line as the ``qsearch`` console script (useful
where the script is not on PATH, and in tests that must use the running interpreter)."""

from qsearch.cli import entry

if __name__ == "__main__":
    entry()
