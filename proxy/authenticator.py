"""Checks a client's credentials against the config: SCRAM verifiers, md5 and plain passwords, JWTs."""

from __future__ import annotations

import hmac
import secrets

from auth.claims import claim_at, reset_settings_sql, session_settings
from auth.errors import AuthError
from auth.identity import Identity
from auth.jwt import check_scope, identity_from_claims
from auth.keys import KeySet
from auth.scram import ScramKeys, ScramVerifier, md5_hash, md5_response
from auth.token_cache import CachedJwtValidator
from config.model import Config, UserConfig
from config.passwords import is_md5_hash, is_scram_verifier
from proxy.protocol import sqlstate


class Authenticator:
    """The credentials side of the config: verifiers derived once per user, the JWT validator and its cache."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._verifiers: dict[str, ScramVerifier] = {}
        # users of auth_query: the keys their last SCRAM login left, which log them in to PostgreSQL
        self.passthrough: dict[str, str | ScramKeys] = {}  # (an md5 user's: its md5 hash)
        self.mock_nonce = secrets.token_bytes(16)  # salts the mock verifiers of users PostgreSQL does not know
        self.jwt: CachedJwtValidator | None = None
        if config.jwt is not None:
            self.jwt = CachedJwtValidator.from_config(config.jwt)

    def verifier_for(self, user: UserConfig) -> ScramVerifier:
        """SCRAM verifier for a user: parsed from the config, or derived once from a plain password."""
        cached = self._verifiers.get(user.name)
        if cached is None:
            if is_scram_verifier(user.password):
                cached = ScramVerifier.parse(user.password)
            else:
                cached = ScramVerifier.from_password(user.password)
            self._verifiers[user.name] = cached
        return cached

    def backend_secret(self, user: UserConfig) -> str | ScramKeys:
        """What a server login of `user` answers PostgreSQL with: its config password, or for a user of
        auth_query its SCRAM keys (its md5 hash, an md5 user's)."""
        return self.passthrough.get(user.name) or user.backend_password

    def check_md5(self, user: UserConfig, given: str, salt: bytes) -> bool:
        return hmac.compare_digest(md5_response(user.name, user.password, salt).encode(), given.encode())

    def check_plain(self, user: UserConfig, given: str) -> bool:
        stored = user.password
        if is_md5_hash(stored):
            return hmac.compare_digest(md5_hash(user.name, given).encode(), stored.encode())
        if is_scram_verifier(stored):
            verifier = self.verifier_for(user)
            derived = ScramVerifier.from_password(given, verifier.salt, verifier.iterations)
            return hmac.compare_digest(derived.stored_key, verifier.stored_key)
        return hmac.compare_digest(stored.encode(), given.encode())

    def authenticate_jwt(self, user: UserConfig, database: str, token: str) -> Identity:
        """A token sent as the password -> Identity with its claims (raises AuthError with the reason)."""
        if self.jwt is None or self.config.jwt is None:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, "JWT authentication is not configured")
        if not token:
            raise AuthError(sqlstate.INVALID_AUTHORIZATION, "JWT required")
        claims = self.jwt.validate_token(token).claims
        if user.required_scope:
            check_scope(claims, user.required_scope)
        return identity_from_claims(claims, self.config.jwt, user=user.name, database=database)

    def tenant_of(self, identity: Identity) -> str | None:
        """The tenant a JWT client's statements are confined to, when the database is sharded by the
        tenant claim ([jwt] shard_by_tenant_claim); None otherwise. Raises AuthError when the token lacks it."""
        cfg = self.config.jwt
        if cfg is None or identity.claims is None or not cfg.tenant_claim or not cfg.shard_by_tenant_claim:
            return None
        value = claim_at(identity.claims, cfg.tenant_claim)
        if value is None or isinstance(value, (dict, list, bool)):
            raise AuthError(sqlstate.INVALID_AUTHORIZATION,
                            f"the token has no usable \"{cfg.tenant_claim}\" claim, which picks its shard")
        return str(value)

    def claims_sql(self, identity: Identity) -> tuple[str, str]:
        """(SQL setting this client's claims on a server session, SQL clearing them)."""
        cfg = self.config.jwt
        if cfg is None or identity.claims is None:
            return ("", "")
        return session_settings(identity.claims, cfg, local=False), reset_settings_sql(cfg)

    def reload(self, config: Config) -> None:
        """New keys and passwords for new logins; connected clients keep their validated identity. Raises
        JwtSetupError (the old keys stay) when the new key files cannot be used."""
        if config.jwt is None:
            self.jwt = None
        elif self.jwt is None:
            self.jwt = CachedJwtValidator.from_config(config.jwt)
        else:
            self.jwt.reload(config.jwt, KeySet.from_config(config.jwt))
        self.config = config
        self._verifiers.clear()
        for user in config.users:  # a name now in the config logs in with its config password
            self.passthrough.pop(user.name, None)
