"""JWT validation cost per token, uncached vs cached, and the memory of a full token cache.

python bench/jwt_validation.py                 # CPU microseconds per validation, per algorithm
python bench/jwt_validation.py --rss 100000    # RSS of a cache holding that many distinct tokens
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from auth.claims import is_forgery_attempt, session_settings
from auth.jwt import JwtValidator
from auth.keys import KeySet
from auth.token_cache import CachedJwtValidator
from config.model import JwtConfig

SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdef"


def realistic_claims(now: float) -> dict[str, Any]:
    """Roughly what Supabase-style issuers put in an access token."""
    return {
        "iss": "https://auth.example.com/auth/v1",
        "aud": "authenticated",
        "sub": str(uuid.uuid4()),
        "email": "someone@example.com",
        "role": "authenticated",
        "app_metadata": {"provider": "email", "tenant_id": str(uuid.uuid4())},
        "session_id": str(uuid.uuid4()),
        "jti": str(uuid.uuid4()),
        "iat": int(now),
        "exp": int(now) + 3600,
    }


def base_cfg(**overrides: Any) -> JwtConfig:
    cfg = JwtConfig(
        issuer="https://auth.example.com/auth/v1",
        audience=("authenticated",),
        required_claims=("sub", "app_metadata.tenant_id"),
        tenant_claim="app_metadata.tenant_id",
    )
    return replace(cfg, **overrides)


def setups(directory: Path) -> list[tuple[str, JwtConfig, Any]]:
    """(algorithm, config, signing key) for every family."""
    result: list[tuple[str, JwtConfig, Any]] = [
        ("HS256", base_cfg(algorithms=("HS256",), secret=SECRET), SECRET)
    ]
    private_keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    for alg, private_key in private_keys.items():
        path = directory / f"{alg}.pem"
        path.write_bytes(
            private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        )
        result.append((alg, base_cfg(algorithms=(alg,), public_keys=(str(path),)), private_key))
    return result


def cpu_us_per_call(action: Callable[[], object], iterations: int) -> float:
    action()  # warm up
    start = time.process_time_ns()
    for _ in range(iterations):
        action()
    return (time.process_time_ns() - start) / iterations / 1000


def run_timings(iterations: int) -> None:
    now = time.time()
    with tempfile.TemporaryDirectory() as directory:
        rows = []
        for alg, cfg, signing_key in setups(Path(directory)):
            token = pyjwt.encode(realistic_claims(now), signing_key, algorithm=alg)
            uncached = JwtValidator(cfg, KeySet.from_config(cfg))
            cached = CachedJwtValidator(JwtValidator(cfg, KeySet.from_config(cfg)))
            rows.append(
                (
                    alg,
                    len(token),
                    cpu_us_per_call(partial(uncached.validate, token), iterations),
                    cpu_us_per_call(partial(cached.validate, token), iterations),
                )
            )
    print(
        f"JWT validation, CPU microseconds per token ({iterations} iterations, Python {sys.version.split()[0]})"
    )
    print(f"{'algorithm':<10} {'token bytes':>11} {'uncached':>10} {'cached':>10}")
    for alg, size, uncached_us, cached_us in rows:
        print(f"{alg:<10} {size:>11} {uncached_us:>10.1f} {cached_us:>10.1f}")

    cfg = base_cfg(secret=SECRET)
    claims = realistic_claims(now)
    statement = "UPDATE orders SET status = 'shipped', updated_at = now() WHERE id = $1 AND tenant_id = $2"
    print()
    print(f"{'per checkout / statement':<40} {'us':>8}")
    settings_us = cpu_us_per_call(lambda: session_settings(claims, cfg, local=True), iterations)
    print(f"{'session_settings (4 claims + JSON)':<40} {settings_us:>8.1f}")
    print(
        f"{'is_forgery_attempt (UPDATE ... SET)':<40} {cpu_us_per_call(lambda: is_forgery_attempt(statement), iterations):>8.1f}"
    )
    plain = "SELECT * FROM orders WHERE id = $1"
    print(
        f"{'is_forgery_attempt (plain SELECT)':<40} {cpu_us_per_call(lambda: is_forgery_attempt(plain), iterations):>8.1f}"
    )


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, Linux reports KiB


def run_rss(count: int) -> None:
    now = time.time()
    cfg = base_cfg(algorithms=("HS256",), secret=SECRET, cache_size=count)
    validator = CachedJwtValidator(JwtValidator(cfg, KeySet.from_config(cfg)))
    # Warm allocator and interpreter paths before the baseline, then keep no tokens around.
    for _ in range(100):
        validator.validate(pyjwt.encode(realistic_claims(now), SECRET, algorithm="HS256"))
    validator.cache.clear()
    gc.collect()
    before = rss_bytes()
    sample_payload = 0
    for _ in range(count):
        token = pyjwt.encode(realistic_claims(now), SECRET, algorithm="HS256")
        sample_payload = len(validator.validate_token(token).payload)
    gc.collect()
    after = rss_bytes()
    assert len(validator.cache) == count
    print(f"token cache holding {count} distinct tokens (payload ~{sample_payload} bytes each):")
    print(f"  RSS before {before / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB")
    print(f"  growth {(after - before) / 2**20:.1f} MiB, {(after - before) / count:.0f} bytes per entry")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument(
        "--rss", type=int, metavar="TOKENS", help="measure RSS of a cache full of TOKENS tokens"
    )
    args = parser.parse_args()
    if args.rss:
        run_rss(args.rss)
    else:
        run_timings(args.iterations)


if __name__ == "__main__":
    main()
