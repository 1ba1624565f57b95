"""Errors that users can act on. The CLI prints them as one line; the API maps them to 4xx."""


class RecmergeError(ValueError):
    """Bad input: a file, option or combination the user can fix."""


class DataError(RecmergeError):
    pass


class CheckpointError(RecmergeError):
    pass


class IncompatibleError(RecmergeError):
    """Checkpoints (or a checkpoint and a dataset/Fisher) that must not be combined."""
