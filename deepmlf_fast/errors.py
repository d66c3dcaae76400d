"""Exception types. Every user-facing check raises one of these with a message that
names the field, what was expected and what was found."""


class DeepMLFError(Exception):
    """Base class of every error deepmlf-fast raises on purpose."""


class ConfigError(DeepMLFError, ValueError):
    """A configuration value or combination is invalid."""


class DataError(DeepMLFError, ValueError):
    """A data file or a batch does not have the expected structure or values."""


class BackboneError(DeepMLFError, ValueError):
    """A backbone cannot be found, loaded or used."""


class CheckpointError(DeepMLFError, ValueError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class TrainingError(DeepMLFError, RuntimeError):
    """Training cannot go on (a non-finite loss or gradient, for instance)."""
