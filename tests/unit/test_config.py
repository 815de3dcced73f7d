"""kmodgate.toml: what a valid file gives, and that every mistake is one
error naming the key and its line."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

from kmodgate.config import KeyLocator, load_config, parse_config, parse_duration
from kmodgate.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gate_fixtures import CONFIG

FULL = CONFIG + """
[[sources]]
name = "playground"
type = "directory"
path = "kernels/playground"
side_band = true
line = "playground/x86_64"

[[sources]]
name = "c9s"
type = "rpm"
baseurl = "file:///srv/repo"

[notify.email]
host = "127.0.0.1"
port = 2525
from = "kmodgate <kmodgate@example.org>"
to = ["kernel-team@example.org"]
username = "gate"
password_env = "KMODGATE_TEST_SMTP_PASSWORD"

[[notify.webhooks]]
url = "http://127.0.0.1:9000/hook"
secret = "s3cret"
events = ["regression", "fix"]
"""


def test_full_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMODGATE_TEST_SMTP_PASSWORD", "pw")
    path = tmp_path / "kmodgate.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config.store_url == f"sqlite:///{tmp_path / 'kmodgate.db'}"
    assert [s.name for s in config.streams] == ["next", "testing", "stable"]
    assert config.stream("testing").policy.min_soak == timedelta(days=3)
    assert config.stream("testing").policy.forbid_older
    assert config.previous_stream("stable") is not None
    assert config.previous_stream("next") is None
    # "required" means every module not marked advisory.
    assert config.policy_modules("next") == ["openrazer-driver", "zfs"]
    assert config.policy_modules("stable") == ["zfs"]
    playground = config.sources[1]
    assert playground.side_band and playground.path == (tmp_path / "kernels/playground")
    assert playground.line == "playground/x86_64"
    assert config.sources[2].baseurl == "file:///srv/repo"
    assert config.modules["openrazer-driver"].maintainers == ("razer@example.org",)
    assert not config.modules["v4l2loopback"].required
    email = config.notify.email
    assert email is not None and email.port == 2525 and email.password == "pw"
    assert config.notify.webhooks[0].events == ("regression", "fix")


def test_tag_selector_and_store_url(tmp_path: Path) -> None:
    text = '[store]\nurl = "sqlite:///state/gate.db"\n' + CONFIG.replace(
        'modules = ["zfs"]', 'modules = "tag:input"')
    config = parse_config(text, tmp_path / "kmodgate.toml")
    assert config.policy_modules("stable") == ["openrazer-driver"]
    assert config.store_url == f"sqlite:///{tmp_path / 'state/gate.db'}"
    pg = parse_config('[store]\nurl = "postgresql://gate@db/kmodgate"\n')
    assert pg.store_url == "postgresql://gate@db/kmodgate"


def error_of(text: str) -> str:
    with pytest.raises(UserError) as info:
        parse_config(text, "kmodgate.toml")
    message = str(info.value)
    assert "\n" not in message
    return message


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ('min_soak = "3d"', 'min_soak = "soon"', "streams[1].min_soak", 'min_soak = "soon"'),
        ("forbid_older = true\n\n[[streams]]\nname = \"stable\"",
         "forbid_older = \"yes\"\n\n[[streams]]\nname = \"stable\"",
         "streams[1].forbid_older", 'forbid_older = "yes"'),
        ('modules = ["zfs"]', 'modules = ["zfs", "nvidia"]', "streams[2].modules",
         'modules = ["zfs", "nvidia"]'),
        ('modules = ["zfs"]', 'modules = "tag:gpu"', "streams[2].modules", "tag:gpu"),
        ('kinds = ["abi", "build"]\nmodules', 'kinds = ["abi", "boot"]\nmodules',
         "streams[2].kinds", '"boot"'),
        ('required = false', 'requird = false', "modules.v4l2loopback.requird", "requird"),
        ('maintainers = ["zfs@example.org"]', 'maintainers = ["zfs team"]',
         "modules.zfs.maintainers", "zfs team"),
        ('type = "debian"', 'type = "gentoo"', "sources[0].type", "gentoo"),
        ('flavour = "amd64"', 'flavor = "amd64"', "sources[0].flavor", "flavor"),
        ('name = "stable"', 'name = "testing"', "streams[2].name", 'name = "testing"\nkinds'),
    ],
)
def test_error_names_key_and_line(old: str, new: str, key: str, needle: str) -> None:
    assert old in CONFIG
    text = CONFIG.replace(old, new, 1)
    message = error_of(text)
    if "\n" in needle:  # a duplicated value: the second occurrence is the wrong one
        lines = [i for i, line in enumerate(text.splitlines(), 1)
                 if line == needle.split("\n")[0]]
        expected = lines[-1]
    else:
        expected = line_of(text, needle)
    assert message.startswith(f"kmodgate.toml:{expected}: {key}: "), message


def test_missing_key_points_at_its_table() -> None:
    text = CONFIG.replace('source = "debian-source:zfs-linux"\n', "")
    message = error_of(text)
    assert message.startswith(f"kmodgate.toml:{line_of(text, '[modules.zfs]')}: modules.zfs: "
                              "missing required key 'source'"), message


def test_toml_syntax_error_has_its_line() -> None:
    text = CONFIG.replace('min_soak = "3d"', "min_soak = 3d")
    message = error_of(text)
    assert message.startswith(f"kmodgate.toml:{line_of(text, 'min_soak = 3d')}: invalid TOML")


def test_first_stream_cannot_soak() -> None:
    text = CONFIG.replace('name = "next"\n', 'name = "next"\nmin_soak = "1d"\n')
    assert "streams[0].min_soak: the first stream has no previous stream" in error_of(text)


def test_secret_from_unset_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMODGATE_NOPE", raising=False)
    text = CONFIG + '\n[notify.email]\nhost = "h"\nfrom = "a@b.c"\nusername = "u"\n' \
                    'password_env = "KMODGATE_NOPE"\n'
    message = error_of(text)
    assert f":{line_of(text, 'password_env')}: notify.email.password_env: environment " \
           "variable KMODGATE_NOPE is not set" in message


def test_unknown_stream_is_a_user_error(tmp_path: Path) -> None:
    config = parse_config(CONFIG)
    with pytest.raises(UserError, match=r"unknown stream 'prod'.*next, testing, stable"):
        config.stream("prod")
    with pytest.raises(UserError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(("text", "expected"), [
    ("3d", timedelta(days=3)), ("12h", timedelta(hours=12)),
    ("1d12h", timedelta(days=1, hours=12)), ("2w", timedelta(weeks=2)), (90, timedelta(90 / 86400)),
    ("soon", None), ("", None), (True, None), (-1, None),
])
def test_durations(text: object, expected: timedelta | None) -> None:
    assert parse_duration(text) == expected


def test_locator_handles_nested_tables_and_multiline_strings() -> None:
    text = '[[a]]\nx = 1\n[[a]]\ny = """\nz = 2\n"""\n[a.sub]\nw = 3\n[b]\nc.d = 4\n'
    loc = KeyLocator(text)
    assert loc.line_of(("a", 1, "y")) == 4
    assert loc.line_of(("a", 1, "z")) == 3  # inside the string: falls back to the table
    assert loc.line_of(("a", 1, "sub", "w")) == 8
    assert loc.line_of(("b", "c", "d")) == 10
