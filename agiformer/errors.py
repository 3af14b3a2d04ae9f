"""The two kinds of error a user can fix, which the command-line tools print as one line, not a traceback."""


class UsageError(ValueError):
    """A flag or input that cannot work (a size, a prompt, an override that does not apply): the tools print
    it as argparse's usage error (exit status 2)."""


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (missing, empty, truncated, damaged, foreign): the message
    names the file and the problem; the tools print it as one line (exit status 1)."""
