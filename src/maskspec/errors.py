"""Errors that the CLI and the server turn into one readable line (no traceback)."""


class MaskspecError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class AdapterError(MaskspecError):
    """An adapter folder that cannot be used with this model."""


class ModelLoadError(MaskspecError):
    """A model argument that cannot be resolved or loaded."""


class PromptTooLongError(MaskspecError):
    """A prompt that does not fit in the model's context window."""


class UsageError(MaskspecError, ValueError):
    """An option or request value outside what it may be (a range, a type, a device that is not there)."""
