"""mesh: the Machine Context Protocol as a ZeroMQ routing mesh."""

__version__ = "0.1.0"
