"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in a recipe, an override, a path or a dataset: the message names what is wrong and where."""
