"""The exceptions that reach users as one-line messages instead of tracebacks.

Library code speaks of files and values: :class:`InvalidSetting` names the setting (a field of a settings
object, such as ``image_size``), never a command-line flag. The command line turns setting names into its
option names in one place (:mod:`cryo_forum.commands.options`).
"""


class CryoForumError(Exception):
    """A problem with the user's input: the message names the file or value at fault."""


class InvalidSetting(CryoForumError):
    """A setting out of range; ``setting`` is its name in the library (e.g. ``image_size``)."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message
