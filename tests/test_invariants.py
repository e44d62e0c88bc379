"""The invariants the code claims in its docstrings, kept by a test rather than by comments.

- only `cli` prints or exits (print, sys.exit, writes to sys.stdout);
- only `daemon` forks, and only it ends a forked process (os._exit);
- only `pidfile` takes the pid-file and guard locks; `state` owns a third lock, on the
  state file's content; nobody else calls flock or lockf;
- only `signals` installs signal handlers or changes the signal mask;
- every `Tests:` line in a module's docstring names files that exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted((REPO / "chatd").glob("*.py"))


def calls(path: Path) -> list[str]:
    """Every call in a module as a dotted name: "os.fork", "print", "loop.add_signal_handler"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            found.append(ast.unparse(node.func))
    return found


def owners(predicate) -> set[str]:
    return {path.stem for path in MODULES if any(predicate(name) for name in calls(path))}


def test_the_modules_are_found():
    assert {"cli", "daemon", "pidfile", "signals", "state", "control", "server"} <= {p.stem for p in MODULES}


@pytest.mark.parametrize("what, predicate, allowed", [
    ("prints", lambda c: c in ("print", "sys.stdout.write", "sys.stderr.write", "pprint"), {"cli"}),
    ("exits", lambda c: c in ("sys.exit", "exit", "quit"), {"cli"}),
    ("ends a process at once", lambda c: c == "os._exit", {"daemon"}),
    ("forks or executes", lambda c: c in ("os.fork", "os.forkpty", "os.posix_spawn", "os.system", "os.popen")
     or c.startswith(("os.exec", "os.spawn", "subprocess.", "pty.fork")), {"daemon"}),
    ("locks files", lambda c: c in ("fcntl.flock", "fcntl.lockf"), {"pidfile", "state"}),
    ("installs signal handlers", lambda c: c in ("signal.signal", "signal.pthread_sigmask", "signal.set_wakeup_fd",
                                                 "signal.siginterrupt")
     or c.endswith(".add_signal_handler"), {"signals"}),
])
def test_one_owner(what, predicate, allowed):
    assert owners(predicate) <= allowed, f"only {allowed} {what}; also: {owners(predicate) - allowed}"
    assert owners(predicate), f"nobody {what}: the check looks for the wrong names"


def test_state_locks_only_its_own_file():
    """state.py's flock calls all take the state file's descriptor (`self._fd` or the reader's)."""
    tree = ast.parse((REPO / "chatd" / "state.py").read_text())
    targets = {ast.unparse(n.args[0]) for n in ast.walk(tree)
               if isinstance(n, ast.Call) and ast.unparse(n.func) == "fcntl.flock"}
    assert targets == {"self._fd", "fd"}
    assert "third lock" in (REPO / "chatd" / "state.py").read_text()


TESTS_LINE = re.compile(r"^Tests: (.+)$", re.M)


def test_every_tests_line_names_files_that_exist():
    named = 0
    for path in MODULES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in TESTS_LINE.findall(doc):
            for name in (n.strip() for n in line.split(",")):
                named += 1
                assert (REPO / name).is_file(), f"{path.name}: Tests: names {name}, which does not exist"
    assert named >= 10


def test_only_bus_imports_redis_and_only_modes_imports_cluster():
    """A single process keeps its dependencies: redis is imported by bus.py alone, which only
    cluster.py imports, which modes.py imports only when [cluster] bus is set (a function's
    import), and workers.py only with workers, which need a bus."""
    found: dict[str, set[str]] = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.module else [a.name for a in node.names]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.stem)
    assert found.get("redis") == {"bus"}
    assert found.get("bus") == {"cluster"}
    assert found.get("cluster") == {"modes", "workers"}
    module_level = {path.stem for path in MODULES for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.ImportFrom) and node.module == "cluster"}
    assert module_level == set()
