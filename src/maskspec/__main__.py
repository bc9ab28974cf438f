"""`python -m maskspec ...`: the `maskspec` command without its console script (e.g. a source tree on
PYTHONPATH)."""

from maskspec.cli import main

if __name__ == "__main__":
    main()
