"""The reflectevo command."""

from reflectevo.cli.main import main

__all__ = ["main"]
