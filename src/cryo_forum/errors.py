"""The one exception type that reaches users as a one-line message instead of a traceback."""


class CryoForumError(Exception):
    """A problem with the user's input or options; the message names the file or option at fault."""
