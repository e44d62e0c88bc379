"""Which instance a command means, and whether the running one is the server its options ask for.

The rule: an instance is its pid file. `-c` and `--pidfile` choose the pid file
(its name comes from `--pidfile`, `[daemon] pidfile`, or the stem of the `-c`
file), so they choose the instance. Every other setting option (`--host`,
`--port`, `--mode`, ...) describes the server the user expects to find there.
A command whose options do not match the running instance never acts on it:
it fails, names the instance that runs, and says how to run a second one.
The running daemon publishes its settings and listening addresses in its
state file, which is what the options are compared with.

Tests: tests/process/test_instance_rule.py, tests/unit/test_instance.py
"""

from __future__ import annotations

import os
import re
from typing import Any

from . import config as config_mod, files, listen
from .config import Config
from .errors import ChatdError, UsageError
from .paths import InstancePaths, instance_paths

SELECTORS = ("daemon.pidfile",)   # options that choose the instance rather than describe it


def find(config: str | None, overrides: dict[str, tuple[str, str]], cwd: str
         ) -> tuple[Config | None, InstancePaths, str]:
    """The config, the instance's file names, and why the config could not be used ("" if it could).

    `stop` and `status` must still find a running daemon whose config file has
    since been broken: then the pid file comes from `--pidfile`, a readable
    `pidfile = "..."` line in the file, or the default name.
    """
    try:
        cfg = config_mod.load(config, overrides, cwd=cwd)
        return cfg, instance_paths(cfg), ""
    except UsageError:
        raise   # a bad option is the user's to fix, whatever the file says
    except ChatdError as e:
        problem = str(e).replace("\n", "; ")
    chosen = {k: v for k, v in overrides.items() if k in SELECTORS}
    if "daemon.pidfile" not in chosen and config:
        path = os.path.join(cwd, config)
        value = _pidfile_in_broken_config(path)
        if value:
            chosen["daemon.pidfile"] = (os.path.join(os.path.dirname(path), value), "--pidfile")
    cfg = config_mod.load(None, chosen, cwd=cwd)
    if config:
        cfg = Config(path=os.path.abspath(os.path.join(cwd, config)), daemon=cfg.daemon, origins=cfg.origins)
    return None, instance_paths(cfg), problem


_PIDFILE_LINE = re.compile(r"""^\s*pidfile\s*=\s*(?:"([^"]*)"|'([^']*)')\s*(?:#.*)?$""", re.M)


def _pidfile_in_broken_config(path: str) -> str:
    """Best effort: the `pidfile = "..."` setting of a config file tomllib rejects."""
    try:
        text = files.read_regular(path).decode("utf-8", errors="replace")
    except OSError:
        return ""
    m = _PIDFILE_LINE.search(text)
    return (m.group(1) or m.group(2)) if m else ""


def requested(overrides: dict[str, tuple[str, str]], cwd: str) -> dict[str, Any]:
    """The settings the command line asks for, validated (a bad value is a usage error)."""
    described = {k: v for k, v in overrides.items() if k not in SELECTORS}
    if not described:
        return {}
    cfg = config_mod.load(None, described, cwd=cwd)
    return {key: cfg.get(key) for key in described}


def mismatches(wanted: dict[str, Any], state: dict[str, Any] | None) -> list[str]:
    """The options in `wanted` that the running instance (its state file) does not match,
    each as "--flag VALUE"; every option when the state file cannot tell."""
    if not wanted:
        return []
    settings = (state or {}).get("settings")
    listeners = (state or {}).get("listeners")
    if not isinstance(settings, dict) or not isinstance(listeners, list):
        return [_flag(key, value) for key, value in wanted.items()]
    differ = []
    if "server.host" in wanted or "server.port" in wanted:
        if not _listens_on(listeners, wanted.get("server.host"), wanted.get("server.port")):
            differ += [_flag(k, wanted[k]) for k in ("server.host", "server.port") if k in wanted]
    for key, value in wanted.items():
        if key in ("server.host", "server.port"):
            continue
        if not _same(key, value, settings.get(key)):
            differ.append(_flag(key, value))
    return differ


def _listens_on(listeners: list[Any], host: str | None, port: int | None) -> bool:
    """Is every address `host` stands for at `port` served by one of `listeners`? With only
    a port: is anything listening on it? With only a host: on some port of the instance's."""
    try:
        have = [listen.Address(listen.family_of(h), h, int(p)) for h, p in listeners]
    except (TypeError, ValueError):
        return False   # a state file chatd did not write: it proves nothing
    if host is None:
        return any(a.port == port for a in have)
    ports = {port} if port is not None else {a.port for a in have}
    try:
        return any(all(any(a.serves(w) for a in have) for w in listen.resolve(host, p)) for p in ports)
    except ChatdError:
        return False


def _same(key: str, wanted: Any, running: Any) -> bool:
    if key in ("daemon.user", "daemon.group") and wanted and running:
        try:
            look = config_mod.lookup_user if key == "daemon.user" else config_mod.lookup_group
            ids = [look(v) for v in (wanted, running)]
        except config_mod.Invalid:
            return wanted == running
        ids = [getattr(i, "pw_uid", i) for i in ids]
        return ids[0] == ids[1]
    if isinstance(running, list):   # an array setting, as the state file's JSON holds it
        running = tuple(running)
    return wanted == running


def _flag(key: str, value: Any) -> str:
    return f"{config_mod.KEYS[key].flag} {value}"


def describe(state: dict[str, Any] | None) -> str:
    """What the running instance serves, for messages: "echo on 0.0.0.0:7777"."""
    if not state:
        return "an unknown server (its state file cannot be read)"
    return f"{state.get('mode', '?')} on {state.get('address', '?')}"


def mismatch_error(paths: InstancePaths, pid: int | None, state: dict[str, Any] | None,
                   differ: list[str], what: str, command: str, status: int) -> ChatdError:
    """The refusal: names the running instance, and says how to run a second one."""
    asked = " ".join(differ)
    name = next((d.split()[1] for d in differ if d.split()[0] in ("--port", "--mode")), "2")
    second = os.path.join(os.path.dirname(paths.pidfile), f"chatd-{name}.pid")
    return ChatdError(
        f"the chatd of pid file {paths.pidfile} (pid {pid or 'unknown'}) serves {describe(state)}, "
        f"not {asked}; {what}\n"
        f"to run a second chatd beside it, give it a pid file of its own: "
        f"chatd start {asked} --pidfile {second} (and the same --pidfile to stop, status and "
        f"restart it); or '{command}' without those options acts on the running one",
        status)
