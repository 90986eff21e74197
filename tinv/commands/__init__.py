"""The commands' entry points (pyproject.toml's [project.scripts]): each parses its arguments, calls the library
and prints; a ConfigError is one line and exit status 2 (tinv.errors.refuse)."""
