"""Authentication of parameter-server connections with the job token, through ZeroMQ's ZAP.

Every connection to a server proves it holds the job token (DESIGN
"Contracts" -> Job token) in one of two modes:

- ``AuthMode.PLAIN`` (default): ZMTP PLAIN, username ``"shoal"`` and the
  token as password, in clear on the wire. For trusted networks; costs
  nothing per message.
- ``AuthMode.CURVE``: CurveZMQ, every message encrypted. The server's key
  pair is derived from the token (``secret = z85(sha256(b"shoal-curve:" +
  token))``), so any token holder can compute the server's public key and
  nobody else can complete the handshake; clients use a fresh random key
  pair each and the server accepts any client key.

The server side runs pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`
on the server's own zmq context (ZAP handlers are per context), with the
password check replaced by a constant-time compare that never logs the
token.

Example::

    ctx = zmq.Context()
    zap = start_authenticator(ctx, token, AuthMode.PLAIN)
    sock = ctx.socket(zmq.ROUTER)
    configure_server_socket(sock, token, AuthMode.PLAIN)
    ...
    zap.stop()
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import logging

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from shoal.ps.errors import AuthError

#: The PLAIN username every Shoal process presents.
USERNAME = "shoal"
#: The ZAP domain of Shoal's server sockets.
ZAP_DOMAIN = "shoal"
_MAX_PLAIN_PASSWORD = 255  # ZMTP PLAIN carries the password length in one byte

_log = logging.getLogger("shoal.ps.rpc.auth")


class AuthMode(str, enum.Enum):
    """How connections prove they hold the job token."""

    PLAIN = "plain"
    CURVE = "curve"

    @classmethod
    def parse(cls, mode: "AuthMode | str") -> "AuthMode":
        """``"plain"`` / ``"curve"`` (or a member) -> the member; anything else raises AuthError."""
        try:
            return cls(mode)
        except ValueError:
            raise AuthError(f"auth mode {mode!r} is not known; use one of "
                            f"{[m.value for m in cls]}") from None


def token_bytes(token: str | bytes) -> bytes:
    """Check the job token and return its bytes.

    Raises:
        AuthError: the token is empty, not str/bytes, or longer than 255
            bytes (the PLAIN limit).
    """
    if isinstance(token, str):
        raw = token.encode("utf-8")
    elif isinstance(token, bytes):
        raw = token
    else:
        raise AuthError(f"job token must be a str or bytes, got {type(token).__name__}; "
                        "pass the value of SHOAL_JOB_TOKEN")
    if not raw:
        raise AuthError("job token is empty; set SHOAL_JOB_TOKEN (fleetrun generates one locally; "
                        "on several nodes supply the same secret to every node)")
    if len(raw) > _MAX_PLAIN_PASSWORD:
        raise AuthError(f"job token is {len(raw)} bytes; at most {_MAX_PLAIN_PASSWORD} are "
                        "supported (use a shorter random secret, e.g. 32 hex digits)")
    return raw


def curve_server_keys(token: str | bytes) -> tuple[bytes, bytes]:
    """The server's CURVE key pair ``(public, secret)``, z85-encoded, derived from the token.

    Deterministic: every holder of the token computes the same pair, which
    is how clients learn the server's public key without a key exchange.
    """
    secret = z85.encode(hashlib.sha256(b"shoal-curve:" + token_bytes(token)).digest())
    return zmq.curve_public(secret), secret


class _TokenAuthenticator(ThreadAuthenticator):
    """ThreadAuthenticator whose PLAIN check compares in constant time and never logs the password."""

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        users = self.passwords.get(domain or "*", {})
        expected = users.get(username)
        if expected is None:
            return False, b"Invalid username"
        if hmac.compare_digest(password.encode("latin-1"), expected.encode("latin-1")):
            return True, b"OK"
        _log.info("refused a PLAIN connection with a wrong job token (domain %s)", domain)
        return False, b"Invalid password"


def start_authenticator(context: zmq.Context, token: str | bytes, mode: AuthMode | str) -> ThreadAuthenticator:
    """Start the ZAP handler of ``context`` accepting holders of ``token``; returns it (call ``stop()``).

    Must run before the context's server sockets accept connections: with
    no ZAP handler, libzmq lets every PLAIN client in. One per context.
    Blocks until the handler thread runs.
    """
    mode = AuthMode.parse(mode)
    raw = token_bytes(token)
    # latin-1 maps bytes to str one to one, so a binary token compares exactly (utf-8 with
    # "replace", pyzmq's default, would let different invalid bytes compare equal).
    zap = _TokenAuthenticator(context, encoding="latin-1", log=logging.getLogger("shoal.ps.rpc.zap"))
    zap.start()
    if mode is AuthMode.PLAIN:
        zap.configure_plain(domain=ZAP_DOMAIN, passwords={USERNAME: raw.decode("latin-1")})
    else:
        zap.configure_curve(domain=ZAP_DOMAIN, location=zmq.auth.CURVE_ALLOW_ANY)
    return zap


def configure_server_socket(sock: zmq.Socket, token: str | bytes, mode: AuthMode | str) -> None:
    """Make ``sock`` (before bind) a PLAIN or CURVE server under Shoal's ZAP domain."""
    mode = AuthMode.parse(mode)
    sock.zap_domain = ZAP_DOMAIN.encode()
    if mode is AuthMode.PLAIN:
        token_bytes(token)
        sock.plain_server = True
    else:
        public, secret = curve_server_keys(token)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True


def configure_client_socket(sock: zmq.Socket, token: str | bytes, mode: AuthMode | str) -> None:
    """Give ``sock`` (before connect) the credentials of a token holder in ``mode``."""
    mode = AuthMode.parse(mode)
    raw = token_bytes(token)
    if mode is AuthMode.PLAIN:
        sock.plain_username = USERNAME.encode()
        sock.plain_password = raw
    else:
        public, secret = zmq.curve_keypair()
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = curve_server_keys(raw)[0]


__all__ = ["AuthMode", "USERNAME", "ZAP_DOMAIN", "configure_client_socket", "configure_server_socket",
           "curve_server_keys", "start_authenticator", "token_bytes"]
