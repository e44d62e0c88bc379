"""chatd: a textbook Unix daemon serving a TCP line-echo (and chat) service."""

__version__ = "0.1.0"
