"""The one error class of every config (curate, train, encode, workflow): the CLI exits 2 on it.

A module of its own, without torch, so that commands which only load a config (curate's driver) do not pay for
importing the training stack."""


class ConfigError(ValueError):
    """A config key or value a user wrote is wrong; the message names the key and, where there is one, the fix."""
