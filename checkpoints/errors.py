"""The one error type of the checkpoint importers and savers."""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or malformed; the message names the file and the problem."""
