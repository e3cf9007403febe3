"""The package version, defined once: pyproject.toml reads it, every module imports it here."""

__version__ = "0.1.0"
