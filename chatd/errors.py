"""The ChatdError tree: each error carries its LSB exit status and a one-line message
(a ConfigError may carry several, one a line).

Code below `cli` raises these instead of printing or exiting, so one place
(`cli.main`) turns every failure into `chatd: <message>` and an exit status.
"""

from __future__ import annotations

import errno

# LSB init-script exit statuses (LSB 5.0, "Init Script Actions").
EXIT_OK = 0
EXIT_FAILED = 1          # generic failure; for status: dead but pid file has content
EXIT_USAGE = 2           # invalid or excess arguments
EXIT_NOT_RUNNING = 3     # status: not running
EXIT_PRIVILEGE = 4       # insufficient privilege; for status: unknown
EXIT_CONFIG = 6          # program is not configured
EXIT_NOT_RUNNING_RELOAD = 7  # reload of a stopped service


class ChatdError(Exception):
    """A failure that ends a command with `status` and a one-line `message`.

    `errno_value` is what systemd hears (ERRNO=) when a supervised start fails.
    """

    status = EXIT_FAILED
    errno_value = errno.EIO

    def __init__(self, message: str, status: int | None = None, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if errno_value is not None:
            self.errno_value = errno_value

    def __str__(self) -> str:
        return self.message


class UsageError(ChatdError):
    """Bad command line: unknown command or option, or a bad option value."""

    status = EXIT_USAGE
    errno_value = errno.EINVAL


class ConfigError(ChatdError):
    """Bad or missing config file; the message names file:line where it can.

    A file with several errors gives one ConfigError: `errors` lists them in
    file order, and the message is that list joined with newlines, one error
    a line.
    """

    status = EXIT_CONFIG
    errno_value = errno.EINVAL

    def __init__(self, message: str, status: int | None = None, errno_value: int | None = None,
                 errors: list[str] | None = None) -> None:
        super().__init__(message, status, errno_value)
        self.errors: list[str] = list(errors) if errors else [message]


class PrivilegeError(ChatdError):
    """Not allowed: a privileged port, another user, a directory we may not use."""

    status = EXIT_PRIVILEGE
    errno_value = errno.EACCES


class StartError(ChatdError):
    """The daemon could not start (address in use, aborted by a signal, ...)."""

    status = EXIT_FAILED


def setting_error(origin: str, message: str) -> ChatdError:
    """An error about one setting, classed by where the setting came from.

    A value given on the command line is a usage error (2); one from a config
    file is a config error (6). `origin` is "--port" or "FILE:LINE".
    """
    if origin.startswith("-"):
        return UsageError(f"{origin}: {message}")
    return ConfigError(f"{origin}: {message}")
