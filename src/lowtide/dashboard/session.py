"""Dashboard sessions: a signed, HttpOnly, SameSite=Strict cookie, and a CSRF token per session.

The cookie never holds the API key. It holds the project, a short fingerprint of the key, an
expiry and a random nonce, signed with HMAC under a key derived from the API key itself: so a
cookie cannot be forged without the key, every server process with the same configuration
accepts it (no shared secret to store), and removing a key from the configuration ends its
sessions at once. Without `[auth] api_keys` the dashboard has no login, but it still gets a
cookie (signed with a per-process secret) so that its buttons carry a CSRF token too.

The CSRF token is derived from the session (HMAC of its nonce): it is sent in a hidden form field
or an `X-CSRF-Token` header and checked on every POST, on top of SameSite=Strict and an
Origin check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass

import orjson

from lowtide.vocabulary import DEFAULT_PROJECT

COOKIE = "lowtide_session"
SESSION_SECONDS = 12 * 3600
_ANONYMOUS = "-"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    project: str
    csrf: str
    expires_at: int
    authenticated: bool  # logged in with an API key (False: no keys configured)


@dataclass(frozen=True, slots=True)
class _Key:
    project: str
    signing_key: bytes


class Sessions:
    def __init__(self, api_keys: dict[str, str]) -> None:
        """`api_keys`: key -> project, as configured; empty: no login, the default project."""
        self.auth = bool(api_keys)
        self._keys = {self._key_id(k): _Key(p, self._signing_key(k)) for k, p in api_keys.items()}
        self._api_keys = api_keys
        self._anonymous = _Key(DEFAULT_PROJECT, os.urandom(32))

    @staticmethod
    def _key_id(api_key: str) -> str:
        return hashlib.sha256(b"lowtide-dashboard-key-id\0" + api_key.encode()).hexdigest()[:16]

    @staticmethod
    def _signing_key(api_key: str) -> bytes:
        return hashlib.sha256(b"lowtide-dashboard-session\0" + api_key.encode()).digest()

    def project_of_key(self, api_key: str) -> str | None:
        """The project of a key typed into the login form, or None."""
        for known, project in self._api_keys.items():
            if hmac.compare_digest(known.encode(), api_key.encode()):
                return project
        return None

    def issue(self, api_key: str | None) -> str:
        """A new cookie value: for `api_key` (auth on), or the anonymous session (auth off)."""
        key_id = self._key_id(api_key) if api_key is not None else _ANONYMOUS
        key = self._keys[key_id] if api_key is not None else self._anonymous
        payload = orjson.dumps(
            {
                "p": key.project,
                "k": key_id,
                "e": int(time.time()) + SESSION_SECONDS,
                "n": secrets.token_urlsafe(16),
            }
        )
        body = _b64(payload)
        return f"{body}.{_b64(hmac.new(key.signing_key, body.encode(), 'sha256').digest())}"

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie, or None if it is missing, forged, expired or revoked."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 1024:
            return None
        body, signature = cookie.split(".")
        try:
            payload = orjson.loads(_unb64(body))
            key_id, project = payload["k"], payload["p"]
            expires_at, nonce = int(payload["e"]), str(payload["n"])
            given = _unb64(signature)
        except (ValueError, KeyError, TypeError):
            return None
        if key_id == _ANONYMOUS:
            key = None if self.auth else self._anonymous
        else:
            key = self._keys.get(key_id) if self.auth else None
        if key is None or key.project != project or expires_at < time.time():
            return None
        expected = hmac.new(key.signing_key, body.encode(), "sha256").digest()
        if not hmac.compare_digest(expected, given):
            return None
        csrf = _b64(hmac.new(key.signing_key, b"csrf\0" + nonce.encode(), "sha256").digest())
        return Session(project, csrf, expires_at, key_id != _ANONYMOUS)
