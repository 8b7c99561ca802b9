"""Who owns a stored response: a hash of the API key that created it, so one key never reads another's.

The AuthMiddleware has already accepted the request when this runs; here we only need to know *which* key it
carried. A zhipuai JWT changes with every request, so it stands for the configured `id.secret` key that signed it.
With auth off every caller is the same owner. The store holds scrypt digests, not keys: a copy of the database
does not hand out the keys, nor cheap guesses at weak ones.
"""

from __future__ import annotations

import hashlib
import threading

import jwt
from fastapi import Request

from server.api.auth import REJECTION, bearer_token

ANONYMOUS = "anonymous"
_SALT = b"glm-serve responses owner v1"


class Owners:
    def __init__(self, keys: list[str]):
        self._keys = set(keys)
        self._zhipu = [k for k in keys if k.count(".") == 1 and all(k.split("."))]
        self._digests: dict[str, str] = {}  # one entry per configured key at most
        self._lock = threading.Lock()

    def of(self, request: Request) -> str:
        if not self._keys:
            return ANONYMOUS
        token = bearer_token(dict(request.scope["headers"]))
        key = token if token in self._keys else self._signer(token)
        if key is None:  # not reachable past the AuthMiddleware; if it were, no owner is shared by mistake
            raise REJECTION
        return self._digest(key)

    def _signer(self, token: str) -> str | None:
        """The configured zhipuai key whose secret signed this JWT."""
        try:
            claimed = jwt.decode(token, options={"verify_signature": False}).get("api_key")
        except jwt.PyJWTError:
            return None
        for key in self._zhipu:
            key_id, secret = key.split(".")
            if key_id != claimed:
                continue
            try:  # expiry was checked by the middleware (milliseconds, which pyjwt would misread)
                jwt.decode(token, secret, algorithms=["HS256"], options={"verify_exp": False})
                return key
            except jwt.PyJWTError:
                continue
        return None

    def _digest(self, key: str) -> str:
        with self._lock:
            if key not in self._digests:  # ~50 ms once per key and process
                raw = hashlib.scrypt(key.encode("utf-8", "surrogatepass"), salt=_SALT, n=2**14, r=8, p=1)
                self._digests[key] = raw.hex()
            return self._digests[key]
