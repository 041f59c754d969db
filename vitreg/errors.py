"""The one exception type for errors a user can cause (bad files, bad options)."""


class VitregError(Exception):
    """A problem with the user's input; the message names the file and the problem.

    The command line prints it as one line ``vitreg: error: ...`` and exits with code 2.
    """
