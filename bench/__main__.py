"""`python -m bench`: see bench/cli.py and docs/performance.md."""

from bench.cli import main

if __name__ == "__main__":
    main()
