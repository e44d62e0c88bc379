"""The README stays true: the daemon steps (functions and tests exist, order matches the code),
the module map (every module, and nothing else), the configuration table (made from the schema),
and the links it gives to documents in the repository."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def step_rows() -> list[dict]:
    text = (REPO / "README.md").read_text()
    section = text.split("## The daemon, step by step", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[2].startswith("`") and cells[0] != "step":
            rows.append({"step": cells[0], "source": cells[1], "function": cells[2].strip("`"),
                         "test": cells[3].strip("`")})
    return rows


def resolve(dotted: str):
    module, *attrs = dotted.split(".")
    obj = importlib.import_module(f"chatd.{module}")
    for attr in attrs:
        obj = getattr(obj, attr)
    return obj


def calls_in(tree: ast.Module, name: str) -> list[ast.Call]:
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
    return sorted(calls, key=lambda c: (c.lineno, c.col_offset))


def call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def daemon_call_order() -> list[str]:
    """The names chatd calls on its way from `start` to serving: start up to the fork,
    then the child's `_become_daemon`, with `lifetime.serve` inlined."""
    tree = ast.parse((REPO / "chatd" / "control.py").read_text())
    body = ast.parse((REPO / "chatd" / "lifetime.py").read_text())
    order: list[str] = []
    for call in calls_in(tree, "start"):
        order.append(call_name(call))
        if order[-1] == "fork_invoker":
            break
    for call in calls_in(tree, "_become_daemon"):
        if call_name(call) == "serve":
            order += [call_name(c) for c in calls_in(body, "serve")]
        else:
            order.append(call_name(call))
    return order


def test_the_table_has_every_classic_step():
    rows = step_rows()
    assert len(rows) >= 18
    sources = {r["source"] for r in rows}
    assert {"daemon(7)", "libucw", "chatd"} <= sources


def test_every_function_in_the_table_exists():
    for row in step_rows():
        assert callable(resolve(row["function"])), row


def test_every_test_in_the_table_exists():
    for row in step_rows():
        path, _, name = row["test"].partition("::")
        source = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), row["test"]


def test_the_daemon_steps_are_listed_in_the_order_the_code_takes_them():
    order = daemon_call_order()
    positions = []
    for row in step_rows():
        if row["source"] == "libucw":
            continue
        name = row["function"].rsplit(".", 1)[1]
        if name in order:
            positions.append((order.index(name), row["function"]))
    assert len(positions) >= 11, positions
    assert positions == sorted(positions), positions


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_module_map_lists_every_module_once():
    section = readme_section("Reading the code")
    listed = re.findall(r"^\| `(\w+)` \|", section, re.M)
    modules = {p.stem for p in (REPO / "chatd").glob("*.py")} - {"__init__", "__main__"}
    assert sorted(listed) == sorted(modules), set(listed) ^ modules


def test_the_module_map_comes_early():
    """For the learner: the map comes before the command reference."""
    text = (REPO / "README.md").read_text()
    assert text.index("\n## Reading the code\n") < text.index("\n## Commands and exit codes\n")


def test_the_path_of_a_line_names_real_functions():
    section = readme_section("Reading the code").split("| module | job |")[0]
    modules = {p.stem for p in (REPO / "chatd").glob("*.py")}
    names = {n for n in re.findall(r"`((?:[a-z]+\.)[A-Za-z_.]+)`", section) if n.split(".")[0] in modules}
    assert len(names) >= 8, names
    for dotted in names:
        assert resolve(dotted) is not None, dotted


def test_the_config_table_is_the_schemas():
    from chatd.config import reference_table
    assert reference_table() in readme_section("Configuration")


def test_the_documents_the_readme_links_exist():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "tests/perf/README.md" in links and "tests/README.md" in links
    for link in links:
        assert (REPO / link).is_file(), link


def test_the_internet_sample_config_is_valid(tmp_path):
    """The TOML sample that opens "Running it on the internet" names only real keys with good
    values: it loads, its [tls] files swapped for a certificate made here."""
    import subprocess
    import tomllib

    from chatd import config
    section = readme_section("Running it on the internet")
    text = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    data = tomllib.loads(text)
    assert {f"{s}.{k}" for s, table in data.items() for k in table} <= set(config.KEYS)
    cert, key = tmp_path / "chatd.crt", tmp_path / "chatd.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=localhost", "-days", "2", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    conf = tmp_path / "chatd.conf"
    conf.write_text(text.replace(data["tls"]["certificate"], str(cert)).replace(data["tls"]["key"], str(key)))
    cfg = config.load(str(conf))
    assert cfg.tls.certificate == str(cert) and cfg.server.listen == (":7777", "tls://:7443")
