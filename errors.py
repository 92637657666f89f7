"""One clear line for bad input, and for a training run that diverged.

Every script raises `InputError` for problems with what the user gave it (a missing file, a wrong
shape, an option that cannot work) and runs its `main(argv)` through `run`, which prints the message
as a single `error: ...` line and exits non-zero (2) instead of showing a traceback from deep inside
numpy, h5py or torch. A loss that became NaN or inf is `TrainingDiverged` (exit 3): nothing the user
typed was wrong, and the message says where the last good checkpoint is.
"""
import argparse
import sys


class InputError(Exception):
    """A problem with the user's input. The message names the file or option and what is wrong."""


class TrainingDiverged(Exception):
    """The training loss became NaN or inf: not the user's input, but the run cannot go on."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors raised as InputError, so they too print as one line."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def run(main, argv=None):
    """Call `main(argv)`; return 0, or print an InputError as one line on stderr and return 2."""
    try:
        main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
