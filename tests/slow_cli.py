"""Run the `snakes` command line with one function paused, so a test can signal it at a known moment.

    python tests/slow_cli.py MODULE:FUNCTION[@N] SECONDS -- ARGS...

The N-th call (default 1) of MODULE.FUNCTION runs, then prints PAUSED (flushed) and sleeps SECONDS: the state at
that moment is what a signal sent then interrupts (e.g. a checkpoint folder half written)."""
import importlib
import signal
import sys
import time

spec, seconds, sep, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
assert sep == "--", "usage: slow_cli.py MODULE:FUNCTION[@N] SECONDS -- ARGS..."
signal.signal(signal.SIGINT, signal.default_int_handler)     # even if the test runner's process ignores SIGINT
target, _, nth = spec.partition("@")
module, name = target.split(":")
mod = importlib.import_module(module)
original, calls = getattr(mod, name), [0]


def paused(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(nth or 1):
        print("PAUSED", flush=True)
        time.sleep(seconds)
    return result


setattr(mod, name, paused)
from snakes_lib.cli import main  # noqa: E402

sys.exit(main(argv))
