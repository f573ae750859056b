"""`python -m snakes_lib` runs the `snakes` command line."""
import sys

from snakes_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
