"""User-facing errors: one line that names the key, file or value and says how to fix it."""


class ConfigError(Exception):
    """Bad input from the user (config, files, environment). The CLI prints it as one line and exits with 2."""
