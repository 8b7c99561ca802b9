"""API-key authentication: OpenAI `Bearer <key>` and ZhipuAI `id.secret` keys, plain or as the SDK's JWT.

A pure ASGI middleware rather than a FastAPI dependency, so that every route is covered, including ones added
later and unknown /v1 paths (a 404 there would tell an anonymous caller which routes exist). Only an explicit
allowlist stays open: /health (for load balancers and `docker healthcheck`), the web page and its static files.

Keys are compared as HMAC-SHA256 digests under a per-process random key, with `hmac.compare_digest` against
every configured key and no early exit: neither the time taken nor the reply says which key (or how much of
one) was close. Every rejection gets the same 401 body.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import warnings

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError

OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# Longer than any key or SDK token; bounds the work an anonymous caller can make us do per request.
MAX_TOKEN_CHARS = 4096
# Newer pyjwt warns on HMAC keys under 32 bytes; ZhipuAI secrets are shorter by design and the warning would
# fire on every request. (The zhipuai SDK pins pyjwt to 2.8.x, which has no such warning.)
_SHORT_KEY_WARNING = getattr(getattr(jwt, "warnings", None), "InsecureKeyLengthWarning", None)
if _SHORT_KEY_WARNING is not None:
    warnings.filterwarnings("ignore", category=_SHORT_KEY_WARNING)

REJECTION = APIError(
    401,
    "Incorrect API key provided. Send a key of this server as 'Authorization: Bearer <key>'.",
    code="invalid_api_key",
    error_type="authentication_error",
    headers={"WWW-Authenticate": "Bearer"},
)


class KeyRing:
    """The configured keys, and the one question asked of them: does this request carry one?"""

    def __init__(self, keys: list[str]):
        self._pepper = secrets.token_bytes(32)
        self._digests = [self._digest(k) for k in keys]
        # ZhipuAI keys are `<id>.<secret>`; the SDK's JWT names the id and is signed with the secret.
        self._zhipu = [tuple(k.split(".")) for k in keys if k.count(".") == 1 and all(k.split("."))]
        self._dummy_secret = secrets.token_urlsafe(32)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def _digest(self, value: str) -> bytes:
        # Header values arrive latin-1 decoded; utf-8 bytes make any str comparable (compare_digest on str
        # raises TypeError for non-ASCII text, which would be a 500 for a junk header).
        return hmac.new(self._pepper, value.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def accepts(self, token: str) -> bool:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return False
        digest = self._digest(token)
        match = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            match |= hmac.compare_digest(digest, known)
        if token.count(".") == 2:  # a JWT: header.payload.signature
            match |= self._accepts_jwt(token)
        return match

    def _accepts_jwt(self, token: str) -> bool:
        """The zhipuai SDK's token (`disable_token_cache=False`): HS256, payload api_key/exp/timestamp in ms."""
        try:
            claimed = jwt.decode(token, options={"verify_signature": False}).get("api_key")
        except jwt.PyJWTError:
            return False
        if not isinstance(claimed, str):
            return False
        secret = self._dummy_secret  # an unknown id still costs one signature check, like a known one
        for key_id, key_secret in self._zhipu:
            if hmac.compare_digest(claimed.encode("utf-8", "surrogatepass"), key_id.encode()):
                secret = key_secret
        try:
            # exp is in milliseconds, which pyjwt would read as seconds (~50,000 years away): checked below.
            payload = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_exp": False})
        except jwt.PyJWTError:
            return False
        exp = payload.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp < time.time() * 1000:
            return False
        return secret is not self._dummy_secret


def bearer_token(headers: dict[bytes, bytes]) -> str:
    """`Authorization: Bearer <token>` (scheme case-insensitive); a bare token or `x-api-key` also count."""
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, rest = auth.partition(" ")
    if rest and scheme.lower() == "bearer":
        return rest.strip()
    if auth and not rest:
        return auth  # old zhipuai SDKs send the JWT without a scheme
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyRing):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.keys.accepts(bearer_token(dict(scope["headers"]))):
            await self.app(scope, receive, send)
            return
        await REJECTION.response()(scope, receive, send)
