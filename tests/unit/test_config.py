"""chatd.config.load: defaults, file, command line, and file:line errors (README "Configuration")."""

from __future__ import annotations

import os
import pwd
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd import config, rooms
from chatd.config import SCHEMA, Config, load
from chatd.errors import EXIT_CONFIG, EXIT_USAGE, ConfigError, UsageError

# README "Configuration", copied from the contract (not from the code).
SPEC_DEFAULTS = {
    # The contract said 0.0.0.0; issue 15 asks for IPv6 too: "" is every address (listen.resolve).
    "server.listen": (),
    "server.host": "",
    "server.port": 7777,
    "server.mode": "echo",
    "server.backlog": 1024,
    "server.workers": 1,
    "server.loop": "auto",
    "daemon.pidfile": "",
    "daemon.user": "",
    "daemon.group": "",
    "daemon.drain_timeout": 10.0,
    "log.target": "",
    "log.level": "info",
    "log.format": "text",
    "log.syslog_socket": "/dev/log",
    "log.facility": "daemon",
    "limits.max_line": 4096,
    "limits.max_clients": 10000,
    "limits.max_clients_per_ip": 100,
    "limits.connect_rate": 0.0,
    "limits.connect_burst": 10,
    "limits.logged_per_ip": 100,
    "limits.idle_timeout": 0,
    "limits.output_buffer": 262144,
    "limits.rate": 10.0,
    "limits.burst": 20,
    "limits.keepalive": 60,
    "access.allow": (),
    "access.deny": (),
    "access.proxy_from": (),
    "chat.motd": "",
    "chat.default_room": "lobby",
    "cluster.bus": "",
    "cluster.node_id": "",
    "cluster.prefix": "chatd",
    "cluster.heartbeat": 1.0,
    "cluster.node_timeout": 3.0,
    "cluster.reconnect_max": 5.0,
    "cluster.guest_block": 100,
}

HERE = "# <- HERE"


def write(tmp_path, text: str, name: str = "chatd.conf"):
    path = tmp_path / name
    path.write_text(text)
    return path


def marked_line(text: str) -> int:
    """The 1-based number of the line carrying the HERE marker."""
    for number, line in enumerate(text.splitlines(), 1):
        if HERE in line:
            return number
    raise AssertionError("no marker in the test's config text")


def config_error(path, text: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(str(path))
    err = info.value
    assert err.status == EXIT_CONFIG == 6
    if text is not None:
        where = f"{path}:{marked_line(text)}:"
        assert where in str(err), f"expected {where!r} in {str(err)!r}"
    return err


def usage_error(overrides: dict, flag: str) -> UsageError:
    with pytest.raises(UsageError) as info:
        load(None, overrides)
    err = info.value
    assert err.status == EXIT_USAGE == 2
    assert flag in str(err), f"expected {flag!r} in {str(err)!r}"
    assert not isinstance(err, ConfigError)
    return err


def no_such_user() -> str:
    name = "chatd_no_such_user_q7"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    return name


# ------------------------------------------------------------------ defaults

def test_load_without_a_file_gives_the_spec_defaults():
    cfg = load()
    assert isinstance(cfg, Config)
    assert cfg.path is None
    for dotted, value in SPEC_DEFAULTS.items():
        got = cfg.get(dotted)
        assert got == value, dotted
        assert not isinstance(got, bool), dotted
        if isinstance(value, float):
            assert isinstance(got, float), dotted
        assert cfg.origin(dotted) == "default"


def test_every_key_has_a_default_and_the_spec_lists_every_key():
    assert {k.dotted for k in SCHEMA} == set(SPEC_DEFAULTS)


def test_float_keys_are_floats_by_default():
    cfg = load()
    assert isinstance(cfg.daemon.drain_timeout, float)
    assert isinstance(cfg.limits.rate, float)


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path, "")
    cfg = load(str(path))
    assert cfg.path == str(path)
    for dotted, value in SPEC_DEFAULTS.items():
        assert cfg.get(dotted) == value


def test_comment_only_file_and_empty_sections(tmp_path):
    cfg = load(str(write(tmp_path, "# nothing\n\n[server]\n[limits]\n")))
    assert cfg.server.port == 7777


# ------------------------------------------------------------------ file and command line

def test_file_overrides_defaults(tmp_path):
    text = """\
[server]
host = "127.0.0.1"
port = 8000
mode = "chat"
loop = "asyncio"

[daemon]
drain_timeout = 2.5

[log]
level = "debug"
facility = "local3"

[limits]
max_line = 100
output_buffer = 100
max_clients = 0
burst = 1
keepalive = 0

[chat]
motd = "hello\\nworld"
default_room = "#Games"
"""
    path = write(tmp_path, text)
    cfg = load(str(path))
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.port == 8000
    assert cfg.server.mode == "chat"
    assert cfg.server.loop == "asyncio"
    assert cfg.daemon.drain_timeout == 2.5
    assert cfg.log.level == "debug"
    assert cfg.log.facility == "local3"
    assert cfg.limits.max_line == 100
    assert cfg.limits.output_buffer == 100
    assert cfg.limits.max_clients == 0
    assert cfg.limits.burst == 1
    assert cfg.limits.keepalive == 0
    assert cfg.chat.motd == "hello\nworld"
    assert cfg.chat.default_room == "games"
    assert cfg.server.backlog == 1024            # untouched keys keep their defaults
    assert cfg.origin("server.port") == f"{path}:3"
    assert cfg.origin("server.backlog") == "default"


def test_command_line_wins_over_the_file(tmp_path):
    path = write(tmp_path, '[server]\nport = 8000\nmode = "chat"\n[log]\nlevel = "error"\n')
    cfg = load(str(path), {"server.port": ("9000", "--port"), "log.level": ("debug", "--log-level")})
    assert cfg.server.port == 9000
    assert cfg.log.level == "debug"
    assert cfg.server.mode == "chat"            # from the file
    assert cfg.origin("server.port") == "--port"
    assert cfg.origin("server.mode") == f"{path}:3"


def test_command_line_without_a_file():
    cfg = load(None, {"server.port": ("1234", "--port"), "server.mode": ("chat", "--mode"),
                      "server.host": ("::", "--host"), "server.loop": ("asyncio", "--loop")})
    assert (cfg.server.port, cfg.server.mode, cfg.server.host, cfg.server.loop) == (1234, "chat", "::", "asyncio")


def test_integer_accepted_where_a_float_is_expected(tmp_path):
    cfg = load(str(write(tmp_path, "[daemon]\ndrain_timeout = 3\n[limits]\nrate = 5\nidle_timeout = 7\n")))
    assert cfg.daemon.drain_timeout == 3.0 and isinstance(cfg.daemon.drain_timeout, float)
    assert cfg.limits.rate == 5.0 and isinstance(cfg.limits.rate, float)
    assert cfg.limits.idle_timeout == 7.0


def test_dotted_keys_at_top_level(tmp_path):
    cfg = load(str(write(tmp_path, "server.port = 8123\nlimits.burst = 3\n")))
    assert cfg.server.port == 8123 and cfg.limits.burst == 3


def test_differences_between_configs(tmp_path):
    a = load()
    b = load(str(write(tmp_path, "[server]\nport = 8000\n[limits]\nburst = 2\n")))
    assert sorted(a.differences(b)) == ["limits.burst", "server.port"]
    assert a == load()


# ------------------------------------------------------------------ paths

def test_relative_paths_in_the_file_resolve_against_its_directory(tmp_path):
    confdir = tmp_path / "etc" / "chatd"
    confdir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write(confdir, '[daemon]\npidfile = "run/x.pid"\n[log]\ntarget = "../log/chatd.log"\n'
                          'syslog_socket = "sock"\n')
    cfg = load(str(path), cwd=str(elsewhere))
    assert cfg.daemon.pidfile == str(confdir / "run" / "x.pid")
    assert cfg.log.target == str(tmp_path / "etc" / "log" / "chatd.log")
    assert cfg.log.syslog_socket == str(confdir / "sock")


def test_relative_config_path_resolves_against_cwd(tmp_path):
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", '[daemon]\npidfile = "a.pid"\n', name="c.toml")
    cfg = load("conf/c.toml", cwd=str(tmp_path))
    assert cfg.path == str(tmp_path / "conf" / "c.toml")
    assert cfg.daemon.pidfile == str(tmp_path / "conf" / "a.pid")


def test_relative_command_line_paths_resolve_against_cwd(tmp_path):
    confdir = tmp_path / "conf"
    confdir.mkdir()
    cwd = tmp_path / "work"
    cwd.mkdir()
    path = write(confdir, '[daemon]\npidfile = "file.pid"\n')
    cfg = load(str(path), {"daemon.pidfile": ("p/cli.pid", "--pidfile"),
                           "log.target": ("out.log", "--log")}, cwd=str(cwd))
    assert cfg.daemon.pidfile == str(cwd / "p" / "cli.pid")
    assert cfg.log.target == str(cwd / "out.log")


def test_absolute_paths_stay(tmp_path):
    path = write(tmp_path, '[daemon]\npidfile = "/run/chatd/x.pid"\n')
    assert load(str(path)).daemon.pidfile == "/run/chatd/x.pid"


@pytest.mark.parametrize("target", ["syslog", "stderr"])
def test_log_target_keywords_are_not_paths(tmp_path, target):
    path = write(tmp_path, f'[log]\ntarget = "{target}"\n')
    assert load(str(path)).log.target == target
    assert load(None, {"log.target": (target, "--log")}, cwd=str(tmp_path)).log.target == target


# ------------------------------------------------------------------ users and groups

def test_uid_users_are_accepted(tmp_path):
    uid = os.getuid()
    cfg = load(str(write(tmp_path, f'[daemon]\nuser = "#{uid}"\n')))
    assert cfg.daemon.user == f"#{uid}"
    assert load(None, {"daemon.user": (f"#{uid}", "--user")}).daemon.user == f"#{uid}"


def test_uid_without_passwd_entry_needs_a_group(tmp_path):
    used = {entry.pw_uid for entry in pwd.getpwall()}
    uid = next(u for u in range(54321, 70000) if u not in used)
    cfg = load(str(write(tmp_path, f'[daemon]\nuser = "#{uid}"\ngroup = "#{uid}"\n')))
    assert cfg.daemon.user == f"#{uid}"
    text = f'[daemon]\nuser = "#{uid}"  {HERE}\n'
    config_error(write(tmp_path, text, "b.conf"), text)


def test_named_user_is_accepted(tmp_path):
    name = pwd.getpwuid(os.getuid()).pw_name
    assert load(str(write(tmp_path, f'[daemon]\nuser = "{name}"\n'))).daemon.user == name


def test_unknown_user_in_the_file(tmp_path):
    text = f'[daemon]\n# who runs it\n\nuser = "{no_such_user()}"  {HERE}\n'
    err = config_error(write(tmp_path, text), text)
    assert "no such user" in str(err)


def test_unknown_user_on_the_command_line():
    err = usage_error({"daemon.user": (no_such_user(), "--user")}, "--user")
    assert "no such user" in str(err)


def test_unknown_group(tmp_path):
    text = f'[daemon]\ngroup = "chatd_no_such_group_q7"  {HERE}\n'
    config_error(write(tmp_path, text), text)
    usage_error({"daemon.group": ("chatd_no_such_group_q7", "--group")}, "--group")


@pytest.mark.parametrize("bad", ["#abc", "#-1", "#"])
def test_malformed_uid(tmp_path, bad):
    text = f'[daemon]\nuser = "{bad}"  {HERE}\n'
    config_error(write(tmp_path, text), text)
    usage_error({"daemon.user": (bad, "--user")}, "--user")


# ------------------------------------------------------------------ errors in the file, with file:line

BAD_FILE_VALUES = [
    ("server", "port", "0"),
    ("server", "port", "70000"),
    ("server", "port", "-1"),
    ("server", "port", '"7777"'),          # a string where an integer belongs
    ("server", "port", '"junk"'),
    ("server", "port", "true"),            # a boolean is not an integer
    ("server", "port", "[7777]"),          # an array
    ("server", "port", "7777.0"),          # a float is not an integer
    ("server", "port", "{ n = 1 }"),
    ("server", "backlog", "0"),
    ("server", "mode", '"irc"'),
    ("server", "mode", "1"),
    ("server", "mode", '["echo"]'),
    ("server", "loop", '"gevent"'),
    ("server", "host", '"not a host!"'),
    ("daemon", "drain_timeout", "0"),
    ("daemon", "drain_timeout", "-1.5"),
    ("daemon", "drain_timeout", '"5"'),    # a string where a number belongs
    ("daemon", "drain_timeout", "false"),
    ("daemon", "drain_timeout", "inf"),
    ("daemon", "drain_timeout", "nan"),
    ("daemon", "pidfile", "1"),
    ("log", "level", '"verbose"'),
    ("log", "level", '"INFO "'),
    ("log", "facility", '"local8"'),
    ("log", "facility", '"daemons"'),
    ("log", "target", "true"),
    ("limits", "max_line", "15"),
    ("limits", "max_line", "0"),
    ("limits", "max_line", '"4096"'),
    ("limits", "max_clients", "-1"),
    ("limits", "burst", "0"),
    ("limits", "rate", "-1"),
    ("limits", "idle_timeout", "-0.5"),
    ("limits", "keepalive", "-1"),
    ("limits", "output_buffer", "100"),    # below max_line (4096)
    ("chat", "default_room", '"no spaces"'),
    ("chat", "motd", "3"),
]


@pytest.mark.parametrize("section,key,value", BAD_FILE_VALUES,
                         ids=[f"{s}.{k}={v}" for s, k, v in BAD_FILE_VALUES])
def test_bad_value_in_the_file_names_file_and_line(tmp_path, section, key, value):
    text = (f"# chatd test config\n\n[{section}]\n# a comment\n\n"
            f"{key} = {value}  {HERE}\n")
    err = config_error(write(tmp_path, text), text)
    assert key in str(err)


@pytest.mark.parametrize("section,key,value", BAD_FILE_VALUES[:12],
                         ids=[f"{s}.{k}={v}" for s, k, v in BAD_FILE_VALUES[:12]])
def test_bad_value_after_other_sections_and_a_multiline_string(tmp_path, section, key, value):
    text = f'''# chatd
[chat]
motd = """
Welcome.
[server]
port = 0
{key} = 1
"""
default_room = "lobby"

[log]
level = "info"   # fine

[{section}]
# the bad one follows

{key} = {value}  {HERE}
'''
    err = config_error(write(tmp_path, text), text)
    assert key in str(err)


def test_bad_value_after_a_literal_multiline_string(tmp_path):
    text = f"""[chat]
motd = '''
port = 1
'''
[server]
port = 0  {HERE}
"""
    config_error(write(tmp_path, text), text)


def test_bad_value_after_a_single_line_triple_quoted_string(tmp_path):
    text = f'''[chat]
motd = """one line"""
[server]
mode = "x"  {HERE}
'''
    config_error(write(tmp_path, text), text)


def test_triple_quote_inside_a_literal_string_does_not_lose_lines(tmp_path):
    text = f"""[chat]
motd = 'say \"\"\" here'
[server]
port = 0  {HERE}
"""
    assert "'say \"\"\" here'" in text
    config_error(write(tmp_path, text), text)


def test_triple_quote_inside_a_comment_does_not_lose_lines(tmp_path):
    text = f"""[chat]
motd = ""    # for several lines, start with \"\"\"
[server]
port = 0  {HERE}
"""
    config_error(write(tmp_path, text), text)


def test_bad_value_in_a_dotted_key(tmp_path):
    text = f"# top\n\nserver.port = 70000  {HERE}\n"
    config_error(write(tmp_path, text), text)


def test_bad_value_in_an_inline_table(tmp_path):
    text = f"# top\nlimits = {{ burst = 0 }}  {HERE}\n"
    config_error(write(tmp_path, text), text)


def test_bad_value_with_quoted_key_and_indentation(tmp_path):
    text = f'[server]\n  "port" = 0  {HERE}\n'
    config_error(write(tmp_path, text), text)


def test_output_buffer_below_max_line_names_the_output_buffer_line(tmp_path):
    text = f"[limits]\nmax_line = 5000\n# buffer\noutput_buffer = 4999  {HERE}\n"
    err = config_error(write(tmp_path, text), text)
    assert "output_buffer" in str(err)
    load(str(write(tmp_path, "[limits]\nmax_line = 5000\noutput_buffer = 5000\n", "ok.conf")))


def test_max_line_above_the_default_output_buffer_names_the_max_line_line(tmp_path):
    text = f"[limits]\n\nmax_line = 300000  {HERE}\n"
    err = config_error(write(tmp_path, text), text)
    assert "max_line" in str(err)


def test_max_line_16_is_the_minimum(tmp_path):
    assert load(str(write(tmp_path, "[limits]\nmax_line = 16\n"))).limits.max_line == 16


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_accepted(tmp_path, port):
    assert load(str(write(tmp_path, f"[server]\nport = {port}\n"))).server.port == port


def test_unknown_section(tmp_path):
    text = f'[server]\nport = 8000\n\n# misspelt\n[sever]  {HERE}\nport = 1\n'
    err = config_error(write(tmp_path, text), text)
    assert "sever" in str(err)


def test_unknown_key(tmp_path):
    text = f'[server]\n# comment\nport = 8000\n\nprot = 8000  {HERE}\n'
    err = config_error(write(tmp_path, text), text)
    assert "prot" in str(err)


def test_unknown_key_in_a_later_section(tmp_path):
    text = f'[server]\nport = 8000\n[limits]\nmax_line = 100\nmax_lines = 100  {HERE}\n'
    config_error(write(tmp_path, text), text)


def test_key_in_the_wrong_section(tmp_path):
    text = f'[server]\nmax_line = 100  {HERE}\n'
    config_error(write(tmp_path, text), text)


def test_top_level_key_outside_any_section(tmp_path):
    text = f'port = 8000  {HERE}\n[server]\n'
    err = config_error(write(tmp_path, text), text)
    assert "port" in str(err)


def test_section_given_as_an_array_of_tables(tmp_path):
    text = f"# comment\n[[server]]  {HERE}\nport = 8000\n"
    config_error(write(tmp_path, text), text)


def test_first_error_wins_in_file_order(tmp_path):
    text = f'[server]\nport = 0  {HERE}\nmode = "bogus"\n'
    err = config_error(write(tmp_path, text), text)
    assert "port" in str(err)


# ------------------------------------------------------------------ syntax errors and missing files

def test_toml_syntax_error_names_file_and_line(tmp_path):
    text = f'[server]\nport = 8000\n\nmode = = "echo"  {HERE}\n'
    err = config_error(write(tmp_path, text), text)
    assert "(at line" not in str(err)


def test_toml_syntax_error_duplicate_key(tmp_path):
    text = f'[server]\nport = 8000\nport = 8001  {HERE}\n'
    config_error(write(tmp_path, text), text)


def test_toml_syntax_error_unterminated_multiline_string_names_a_line(tmp_path):
    # tomllib reports "(at end of document)" here: the error must still name file:line.
    path = write(tmp_path, '[chat]\nmotd = """\nwelcome\n')
    err = config_error(path)
    assert re.search(re.escape(str(path)) + r":\d+:", str(err)), str(err)


def test_toml_syntax_error_at_end_of_file_names_a_line(tmp_path):
    path = write(tmp_path, "[server]\nport = ")
    err = config_error(path)
    assert re.search(re.escape(str(path)) + r":2:", str(err)), str(err)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "chatd.conf"
    path.write_bytes(b'[chat]\n\nmotd = "\xff\xfe"\n')
    err = config_error(path)
    assert f"{path}:3:" in str(err)


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.conf"
    err = config_error(path)
    assert str(path) in str(err)


def test_directory_as_config_file_is_a_config_error(tmp_path):
    config_error(tmp_path)


# ------------------------------------------------------------------ errors on the command line

BAD_FLAGS = [
    ("server.port", "junk", "--port"),
    ("server.port", "0", "--port"),
    ("server.port", "70000", "--port"),
    ("server.port", "", "--port"),
    ("server.port", "80.5", "--port"),
    ("server.mode", "irc", "--mode"),
    ("server.loop", "gevent", "--loop"),
    ("server.host", "not a host!", "--host"),
    ("log.level", "verbose", "--log-level"),
    ("log.format", "xml", "--log-format"),
]


@pytest.mark.parametrize("dotted,value,flag", BAD_FLAGS, ids=[f"{f}={v}" for _, v, f in BAD_FLAGS])
def test_bad_command_line_value_is_a_usage_error_naming_the_flag(dotted, value, flag):
    usage_error({dotted: (value, flag)}, flag)


def test_bad_command_line_value_with_a_good_file(tmp_path):
    path = write(tmp_path, "[server]\nport = 8000\n")
    with pytest.raises(UsageError) as info:
        load(str(path), {"server.port": ("junk", "-p")})
    assert info.value.status == 2
    assert "-p" in str(info.value)
    assert str(path) not in str(info.value)


def test_good_command_line_does_not_hide_a_bad_file(tmp_path):
    text = f"[server]\nport = 0  {HERE}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(str(path), {"server.port": ("8000", "--port")})
    assert f"{path}:2:" in str(info.value)


# ------------------------------------------------------------------ every error in the file, each with its line

def error_lines(err: ConfigError, path) -> list[int]:
    """The line of each of `err.errors`, checking each starts with "PATH:LINE: "."""
    found = []
    for text in err.errors:
        m = re.match(re.escape(str(path)) + r":(\d+): ", text)
        assert m, f"{text!r} does not start with {path}:LINE:"
        found.append(int(m.group(1)))
    return found


def test_three_semantic_errors_on_three_lines_are_all_reported_in_file_order(tmp_path):
    text = """\
[server]
port = 0
mode = "chat"

[limits]
burst = 2
max_lines = 100

[sever]
host = "x"
"""
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [2, 7, 9]
    assert "[server] port: must be between 1 and 65535, got 0" in err.errors[0]
    assert "unknown key 'max_lines' in [limits]" in err.errors[1]
    assert "unknown section [sever]" in err.errors[2]
    assert str(err) == err.message == "\n".join(err.errors)


def test_errors_come_in_file_order_not_in_table_order(tmp_path):
    # tomllib groups [server] (from [server.sub] on line 1) before [limits], but
    # [server]'s port is on line 6: the errors still follow the lines.
    text = "[server.sub]\nx = 1\n[limits]\nburst = 0\n[server]\nport = 0\n"
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [1, 4, 6]
    assert "'sub'" in err.errors[0] and "burst" in err.errors[1] and "port" in err.errors[2]


def test_a_rule_between_two_keys_is_reported_with_the_other_errors(tmp_path):
    text = "[server]\nport = 70000\n[limits]\nmax_line = 5000\noutput_buffer = 4999\nburst = 0\n"
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [2, 5, 6]
    assert err.errors[1].endswith("[limits] output_buffer (4999) must be at least max_line (5000)")


@pytest.mark.parametrize("text", [
    "[limits]\nmax_line = 300000\noutput_buffer = \"big\"\n",   # max_line would be over the default buffer
    "[limits]\nmax_line = 5\noutput_buffer = 100\n",              # the buffer would be under the default line
])
def test_a_rule_between_two_keys_is_not_checked_against_a_rejected_value(tmp_path, text):
    path = write(tmp_path, text)
    err = config_error(path)
    assert len(err.errors) == 1, err.errors
    assert "must be at least max_line" not in str(err)


def test_uid_without_a_group_is_not_blamed_when_the_group_is_bad(tmp_path):
    used = {entry.pw_uid for entry in pwd.getpwall()}
    uid = next(u for u in range(54321, 70000) if u not in used)
    text = f'[daemon]\nuser = "#{uid}"\ngroup = "chatd_no_such_group_q7"\n'
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [3] and "no such group" in str(err)


def test_one_error_gives_a_list_of_one(tmp_path):
    text = f"[server]\nport = 0  {HERE}\n"
    err = config_error(write(tmp_path, text), text)
    assert err.errors == [err.message]
    assert ConfigError("just this").errors == ["just this"]


def test_file_errors_win_over_a_bad_command_line_value(tmp_path):
    path = write(tmp_path, "[server]\nport = 0\nmode = \"x\"\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), {"server.loop": ("gevent", "--loop")})
    assert error_lines(info.value, path) == [2, 3]


def test_a_name_with_a_newline_does_not_split_its_error(tmp_path):
    path = write(tmp_path, '[server]\n"prot\\nx" = 1\nport = 0\n')
    err = config_error(path)
    assert len(err.errors) == 2 and len(str(err).splitlines()) == 2


# Each is one bad line that leaves the lines after it alone once blanked.
SYNTAX_ERRORS = ["k{i} = = 1", 'k{i} = "unterminated', "k{i} = [1,,2]", "k{i} = 1 2",
                 "[t{i}", "k{i}", "k{i} = 0x", "k{i} = {{ a = 1,, }}"]


def test_two_syntax_errors_on_two_lines_are_both_reported(tmp_path):
    text = '[server]\nport = = 8000\nmode = "echo"\n\n[log]\nlevel = "info\n'
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [2, 6]
    assert all(": TOML syntax error: " in e for e in err.errors)
    assert "(at line" not in str(err)


def test_a_syntax_error_hides_the_semantic_errors(tmp_path):
    text = "[server]\nport = 0\nmode = = 1\n[sever]\n"
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [3]
    assert "TOML syntax error" in err.errors[0]


def test_a_syntax_error_and_one_at_the_end_of_the_document(tmp_path):
    text = '[server]\nport = = 1\n[chat]\nmotd = """\nhello\n'
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [2, 5]
    assert err.errors[1].endswith("at the end")


def test_a_duplicate_key_and_a_bad_line_later(tmp_path):
    text = "[server]\nport = 1\nport = 2\nmode = = 1\n"
    path = write(tmp_path, text)
    assert error_lines(config_error(path), path) == [3, 4]


def test_syntax_errors_with_crlf_line_ends(tmp_path):
    path = tmp_path / "chatd.conf"
    path.write_bytes(b"[server]\r\nport = = 1\r\nmode = \"echo\"\r\nloop = = 2\r\n")
    assert error_lines(config_error(path), path) == [2, 4]


def test_the_search_for_syntax_errors_is_bounded(tmp_path):
    text = "".join(f"k{i} = = 1\n" for i in range(3 * config.SYNTAX_ROUNDS))
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == list(range(1, config.SYNTAX_ROUNDS + 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.none(), st.sampled_from(SYNTAX_ERRORS)), min_size=1, max_size=12)
       .filter(lambda lines: any(lines)))
def test_every_independent_syntax_error_is_reported_once_with_its_line(tmp_path, lines):
    """Lines are good (`kN = N`) or one of SYNTAX_ERRORS: the errors are exactly the bad lines."""
    text = "".join((bad or "k{i} = {i}").format(i=i) + "\n" for i, bad in enumerate(lines))
    path = write(tmp_path, text)
    err = config_error(path)
    assert error_lines(err, path) == [n for n, bad in enumerate(lines, 1) if bad], text


# ------------------------------------------------------------------ room names

def test_one_room_pattern_serves_config_and_rooms(tmp_path):
    assert config.ROOM_RE is rooms.ROOM_RE
    for given_room, room in [("lobby", "lobby"), ("#Lobby", "lobby"), ("a" * 32, "a" * 32), ("#x-_1", "x-_1")]:
        path = write(tmp_path, f'[chat]\ndefault_room = "{given_room}"\n')
        assert load(str(path)).chat.default_room == room
    for bad in ["", "#", "##lobby", "a" * 33, "#" + "a" * 33, "lob by", "lobby#"]:
        text = f'[chat]\ndefault_room = "{bad}"  {HERE}\n'
        config_error(write(tmp_path, text), text)



# ------------------------------------------------------------------ [cluster]

@pytest.mark.parametrize("value, why", [
    ('"http://127.0.0.1:6379"', 'expected "", redis://HOST[:PORT][/DB] or unix:///PATH'),
    ('"redis://127.0.0.1:70000"', "port must be between 1 and 65535"),
    ('"redis://no-such-host.invalid:6379"', "cannot resolve"),
    ("6379", "expected a string"),
])
def test_a_bad_bus_is_reported_at_its_line(tmp_path, value, why):
    text = f"[cluster]\n# the bus\nbus = {value}  {HERE}\n"
    err = config_error(write(tmp_path, text), text)
    assert why in str(err)


def test_good_buses_are_taken_as_written(tmp_path):
    for url in ("", "redis://127.0.0.1", "redis://localhost:6380/2", "redis://[::1]:6379",
                "unix:///run/redis/redis.sock", "unix:///tmp/r.sock?db=3"):
        cfg = load(str(write(tmp_path, f'[cluster]\nbus = "{url}"\n')))
        assert cfg.cluster.bus == url


def test_node_timeout_under_three_heartbeats_names_its_line(tmp_path):
    text = f"[cluster]\nheartbeat = 2.0\nnode_timeout = 5.0  {HERE}\n"
    err = config_error(write(tmp_path, text), text)
    assert "[cluster] node_timeout (5) must be at least 3 x heartbeat (2)" in str(err)


def test_a_node_id_or_prefix_that_could_break_a_key_is_refused(tmp_path):
    for text in (f'[cluster]\nnode_id = "a b"  {HERE}\n', f'[cluster]\nprefix = "x*y"  {HERE}\n',
                 f'[cluster]\nnode_id = "{"n" * 65}"  {HERE}\n'):
        config_error(write(tmp_path, text), text)


def test_workers_need_a_bus(tmp_path):
    text = f"[server]\nworkers = 2  {HERE}\n"
    err = config_error(write(tmp_path, text), text)
    assert "[server] workers = 2 needs [cluster] bus" in str(err)
    cfg = load(str(write(tmp_path, '[server]\nworkers = 2\n[cluster]\nbus = "redis://127.0.0.1"\n', "ok.conf")))
    assert cfg.server.workers == 2


@pytest.mark.parametrize("text, why", [
    ('[cluster]\nbus = "redis://h..x"  ' + HERE + "\n", "not an IP address or host name"),
    ('[cluster]\nbus = "redis://[:::]:1"  ' + HERE + "\n", "not an IPv6 address in brackets"),
    ("[server]\nhost = \"a..b\"  " + HERE + "\n", "not an IP address or host name"),
    ("[cluster]\nnode_timeout = 1e300  " + HERE + "\n", "must be at most 86400"),
    ('[cluster]\nprefix = ""  ' + HERE + "\n", "1 to 64 letters"),
])
def test_cluster_mistakes_found_by_the_red_team_are_errors_at_their_line(tmp_path, text, why):
    err = config_error(write(tmp_path, text), text)
    assert why in str(err)
