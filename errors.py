"""One clear line for bad input.

Every script raises `InputError` for problems with what the user gave it (a missing file, a wrong
shape, an option that cannot work) and runs its `main(argv)` through `run`, which prints the message
as a single `error: ...` line and exits non-zero instead of showing a traceback from deep inside
numpy, h5py or torch.
"""
import argparse
import sys


class InputError(Exception):
    """A problem with the user's input. The message names the file or option and what is wrong."""


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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
