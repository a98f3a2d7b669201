"""User-facing errors: one line that names the problem, printed without a traceback by the CLIs."""


class NeoxRtError(Exception):
    """An error caused by the user's input (path, config, checkpoint, prompt), not by a bug.

    The command-line tools print ``neox_rt: error: <message>`` and exit with status 2.
    """
