"""Common helpers for the Python reference servers of chatd's benchmark (tests/perf)."""
import argparse
import asyncio
import resource
import signal


def parse_args(description, uvloop_flag=True, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--backlog", type=int, default=1024,
                   help="listen backlog (asyncio's own default is 100)")
    if uvloop_flag:
        p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    if extra:
        extra(p)
    a = p.parse_args()
    if not a.host.startswith("127."):
        p.error("loopback addresses only")
    return a


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(main_coro_fn, args):
    """Run main_coro_fn(stop_future) on asyncio or uvloop until SIGTERM/SIGINT."""
    raise_nofile()

    async def wrapper():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, lambda: stop.done() or stop.set_result(None))
        await main_coro_fn(stop)

    if getattr(args, "uvloop", False):
        import uvloop
        uvloop.install()
    asyncio.run(wrapper())
