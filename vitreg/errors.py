"""The one exception type for errors a user can cause (bad files, bad options).

The library names its own parameters in messages, never a command-line flag: a message marks
a parameter as ``{name}``, or a boolean one as ``{name=True}`` / ``{name=False}``. ``str()``
spells them the Python way (``name``, ``name=True``); the command line renders the same error
with its flags (``--name``, ``--no-name``) through :meth:`VitregError.render`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePath

PARAMETER = re.compile(r"\{([a-z][a-z0-9_]*)(?:=(True|False))?\}")
NO_VALUE = object()
"""The value of a parameter that is named without one (``{name}``)."""

Spelling = Callable[[str, object], str]
"""Called as ``spell(name, value)`` (``value`` is NO_VALUE when none is given) -> text."""


def python_spelling(name: str, value: object = NO_VALUE) -> str:
    """``name``, or ``name=value`` with the value's repr (a path's as a string)."""
    if value is NO_VALUE:
        return name
    return f"{name}={str(value)!r}" if isinstance(value, PurePath) else f"{name}={value!r}"


class VitregError(Exception):
    """A problem with the user's input; the message names the file and the problem.

    The command line prints it as one line ``vitreg: error: ...`` and exits with code 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.render(python_spelling)

    def render(self, spell: Spelling) -> str:
        """The message with each marked parameter spelled by ``spell``."""
        return _spell_marks(self.message, spell)


class OptionError(VitregError):
    """A bad value of one parameter: ``option`` (its name), the ``value`` given, the ``problem``.

    Reads ``optimize=-1: must be >= 0`` in Python and ``--optimize -1: must be >= 0`` on the
    command line; ``problem`` may mark other parameters as :class:`VitregError` messages do.
    """

    def __init__(self, option: str, value: object, problem: str) -> None:
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{{{option}}}: {problem}")

    def __reduce__(self) -> tuple:
        # Rebuilt from its three parts, so the error survives pickling (a cluster's worker
        # sends it back to the client).
        return (type(self), (self.option, self.value, self.problem))

    def render(self, spell: Spelling) -> str:
        return f"{spell(self.option, self.value)}: {_spell_marks(self.problem, spell)}"


def _spell_marks(text: str, spell: Spelling) -> str:
    def spelled(match: re.Match) -> str:
        value = NO_VALUE if match[2] is None else match[2] == "True"
        return spell(match[1], value)

    return PARAMETER.sub(spelled, text)
