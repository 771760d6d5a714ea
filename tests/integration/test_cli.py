"""The command line as a new user meets it: `check`, and `quickstart` with psql through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localpg import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


def test_check_reports_every_problem_with_its_key_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[general]\npool_mode = "sesion"\ndefault_pool_size = 0\n\n'
        '[[users]]\nname = "app"\npassword = "x"\nauth = "kerberos"\n\n'
        '[[databases]]\nname = "app"\nport = 70000\n'
    )
    result = _run("check", "-c", str(config))
    assert result.returncode == 1
    for key in ("general.pool_mode", "general.default_pool_size", "users[0].auth", "databases[0].port"):
        assert key in result.stdout, (key, result.stdout)


def test_check_accepts_the_example() -> None:
    result = _run("check", "-c", str(ROOT / "config" / "example.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_run_with_a_broken_config_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[general\n")
    result = _run("-c", str(config))
    assert result.returncode == 1
    assert "line 1" in result.stderr


def test_quickstart_serves_psql_and_cleans_up() -> None:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="shardgate-qs-test-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    target = workdir / "topology"
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "quickstart", "--port", str(port), "--dir", str(target)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith('psql "postgresql://'):
                break
        command = next((ln.strip() for ln in lines if ln.strip().startswith('psql "postgresql://')), None)
        assert command is not None, "".join(lines)
        url = command.split('"')[1]
        assert url == f"postgresql://app:app@127.0.0.1:{port}/app"
        out = subprocess.run(["psql", "-X", "-At", url, "-c", "select 6 * 7, current_user"],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "42|app", out.stderr
        data_dirs = [p for p in (target / "pg").iterdir()] if (target / "pg").exists() else []
        assert len(data_dirs) >= 2  # a primary and a replica
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not (target / "pg").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
