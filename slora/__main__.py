"""``python -m slora``: the ``slora`` command line without the console script."""

from slora.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
