"""cowtree: a copy-on-write B-tree filesystem in one image file.

Importing the package loads nothing heavy; the CLI imports the engine only
when a command needs it.
"""

__version__ = "0.1.0"
