"""chatd: a textbook Unix daemon serving a TCP line-echo (and chat) service."""

__version__ = "0.1.0"
__date__ = "2026-12-05"   # of this version: the man pages' date (chatd.manual), so a rebuild gives the same pages
