"""Fault injection for chatd's process tests.

Only tests put this directory on PYTHONPATH, and only CHATD_TEST_FAULT turns
anything on: it patches the daemon so a test can reach states a healthy
daemon passes through too quickly (or never), without test hooks in chatd.
"""

import os
import signal
import time

_fault = os.environ.get("CHATD_TEST_FAULT", "")

if _fault:
    from chatd import server as _server

    _startup = _server.Server.startup

    if _fault == "sigkill-before-ready":
        async def _die(self):
            os.kill(os.getpid(), signal.SIGKILL)
        _server.Server.startup = _die

    elif _fault == "slow-start":
        async def _slow(self):
            # A blocking sleep: signals that arrive now meet the start-up recorder.
            time.sleep(float(os.environ.get("CHATD_TEST_DELAY", "2")))
            await _startup(self)
        _server.Server.startup = _slow

    elif _fault == "ignore-stop":
        async def _nothing(self):
            pass
        _server.Server.handle_usr1 = _nothing
        _server.Server.handle_term = _nothing
