"""User-facing errors: one line that names the problem, printed without a traceback by the CLIs."""
import argparse


class NeoxRtError(Exception):
    """An error caused by the user's input (path, config, checkpoint, prompt), not by a bug.

    The command-line tools print ``neox_rt: error: <message>`` and exit with status 2.
    """


def read_bytes(path: str, what: str) -> bytes:
    """The bytes of a user-named file, or a NeoxRtError that says which ``what`` (e.g. "input file") failed."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NeoxRtError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise NeoxRtError(f"{what} {path} is a directory") from None
    except OSError as e:
        raise NeoxRtError(f"cannot read {what} {path}: {e.strerror or e}") from None


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose bad-flag errors are a :class:`NeoxRtError` (one line, exit 2 in the CLIs), not
    argparse's usage dump."""

    def error(self, message):
        raise NeoxRtError(message)
