"""The package version, in a module of its own: low layers (STUN SOFTWARE, the CLI) read
it without importing the package's public API."""

__version__ = "0.9.0"
