"""The keys, checked the same way on every front: a request's `Authorization: Bearer <key>` (an HTTP header, or
gRPC's `authorization` metadata), compared in constant time with every key that opens what it asks for.

- Inference (POST /predict, /v2 infer, gRPC ModelInfer): API_KEY and each key of API_KEYS_FILE. The file is read
  again when it has been replaced or changed (its inode, size or modification time differ), looked at on each
  call: a key rotates without a restart by adding the new key, moving the clients, then removing the old one.
- Model control (the repository calls): MODEL_CONTROL_KEY alone; no inference key opens it.
"""

from __future__ import annotations

import hmac
import logging
import os
from enum import StrEnum
from pathlib import Path

from app.errors import Unauthorized
from app.settings import Settings, read_keys

logger = logging.getLogger("app")


class Access(StrEnum):
    INFERENCE = "API key"
    MODEL_CONTROL = "model control key"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case); None otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class KeyFile:
    """API_KEYS_FILE's keys as the file is now (Settings has checked that it held valid keys at start-up)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: tuple[bytes, ...] = ()
        self._version: tuple[int, int, int] | None = (-1, -1, -1)  # inode, size, mtime last seen; None: no file

    def current(self) -> tuple[bytes, ...]:
        """The keys; a version of the file that gives none is logged once, and the keys read before stay valid."""
        try:
            stat = os.stat(self.path)
            version: tuple[int, int, int] | None = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError as exc:
            version, reason = None, f"cannot read it: {exc.strerror}"
        if version == self._version:
            return self.keys
        self._version = version
        if version is not None:
            try:
                keys = read_keys(self.path)
            except (OSError, ValueError) as exc:
                reason = str(exc)
            else:
                if self.keys:
                    logger.info("API_KEYS_FILE %s read again: %d keys", self.path, len(keys))
                self.keys = tuple(key.encode() for key in keys)
                return self.keys
        logger.error("API_KEYS_FILE %s: %s; the keys read before stay valid", self.path, reason)
        return self.keys


class Keys:
    """Which keys open what (the module's docstring): one per server, shared by its fronts."""

    def __init__(self, settings: Settings) -> None:
        self.fixed = () if settings.api_key is None else (settings.api_key.get_secret_value().encode(),)
        self.file = None if settings.api_keys_file is None else KeyFile(settings.api_keys_file)
        control = settings.model_control_key
        self.control = () if control is None else (control.get_secret_value().encode(),)

    def required(self, access: Access) -> bool:
        """Whether a call of this kind needs a key at all."""
        if access is Access.MODEL_CONTROL:
            return bool(self.control)
        return bool(self.fixed) or self.file is not None

    def verify(self, access: Access, authorization: str | None) -> None:
        """Unauthorized unless `authorization` carries a key that opens `access` (or none is required)."""
        if not self.required(access):
            return
        token = bearer_token(authorization)
        if token is None:
            needs = f"this endpoint needs the {access}: send `Authorization: Bearer <key>`"
            raise Unauthorized(needs, token_given=False)
        given = token.encode()
        if not sum(hmac.compare_digest(given, key) for key in self.keys(access)):  # each compared: no early exit
            raise Unauthorized(f"the {access} is not valid", token_given=True)

    def keys(self, access: Access) -> tuple[bytes, ...]:
        if access is Access.MODEL_CONTROL:
            return self.control
        return self.fixed + (self.file.current() if self.file is not None else ())
