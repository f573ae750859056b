"""Why did it have to be snakes? A notebook-first course that builds a Mamba-2 language model from scratch, and the library it produces.

Modules:

- `snakes_lib.cli`: The `snakes` command line (also `python -m snakes_lib`): train, generate, data generate, bench, demo."""

__version__ = "0.1.0"
