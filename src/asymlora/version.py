"""The package version, in a module of its own so that lower layers (file formats write it into
every saved adapter) can read it without importing the package facade."""
__version__ = "0.1.0"
