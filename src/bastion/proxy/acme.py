"""The proxy's certificate over ACME (RFC 8555), with HTTP-01 challenges (decision 0027).

``ensure`` returns the certificate and key files under ``<data_dir>/proxy/acme/``: the kept
certificate while it covers the configured names and has more than a third of its life left,
else a new one ordered from ``proxy_service.acme.directory_url``.  The account key is kept
beside it (0600).  While an order is open, ``http_addr`` answers
``/.well-known/acme-challenge/<token>`` and nothing else.  The ACME client (certbot's
``acme`` package, synchronous) runs in a worker thread.  ``renew_at`` says when to order the
next one; the proxy reloads its listener's context in place (``ProxyService``).

Several proxies each order their own certificate (no shared account or certificate yet).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bastion import __version__
from bastion._listen import bind_tcp
from bastion.config import ACMEConfig, split_addr
from bastion.errors import ConfigError, UpstreamError
from bastion.proxy import h1

log = logging.getLogger("bastion.proxy.acme")

_CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_ORDER_TIMEOUT = timedelta(seconds=120)

#: token -> key authorisation, for the challenges of the open order.
Answers = dict[str, str]


class ACMEError(UpstreamError):
    """The ACME server refused or failed an order (its fault or the set-up's; the message says)."""

    code = "acme_failed"


def _dir(data_dir: Path) -> Path:
    return data_dir / "proxy" / "acme"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def renew_at(cert_pem: bytes) -> datetime:
    """When a certificate should be replaced: two thirds into its life."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


def kept(data_dir: Path, cfg: ACMEConfig, now: datetime) -> tuple[Path, Path] | None:
    """The kept certificate and key, if they cover ``cfg.domains`` and need no renewal yet."""
    d = _dir(data_dir)
    cert, key = d / "tls.crt", d / "tls.key"
    if not (cert.exists() and key.exists()):
        return None
    pem = cert.read_bytes()
    try:
        leaf = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    if not set(_normal(cfg.domains)) <= _names(leaf) or renew_at(pem) <= now:
        return None
    return cert, key


def _normal(domains: list[str]) -> list[str]:
    out = []
    for d in domains:
        try:
            out.append(str(ipaddress.ip_address(d)))
        except ValueError:
            out.append(d.lower().rstrip("."))
    return out


async def ensure(data_dir: Path, cfg: ACMEConfig, *, now: datetime | None = None) -> tuple[Path, Path]:
    """The certificate and key files to serve: kept, or ordered now."""
    now = now or datetime.now(UTC)
    have = kept(data_dir, cfg, now)
    if have is not None:
        return have
    return await order(data_dir, cfg)


async def order(data_dir: Path, cfg: ACMEConfig) -> tuple[Path, Path]:
    """Order a certificate for ``cfg.domains``, answering HTTP-01 on ``cfg.http_addr``."""
    d = _dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    answers: Answers = {}
    host, port = split_addr(cfg.http_addr, allow_zero=True)
    try:
        sock = bind_tcp(host, port)
    except OSError as e:
        raise ConfigError(
            "proxy_service.acme.http_addr", f"cannot listen on {host}:{port}: {e.strerror}"
        ) from None
    server = await h1.serve(sock, _challenge_app(answers), ssl_ctx=None, shutdown_timeout=1.0)
    try:
        chain, key_pem = await asyncio.to_thread(_order_sync, d, cfg, answers.__setitem__)
    finally:
        server.close()
        await server.wait_closed()
    cert, key = d / "tls.crt", d / "tls.key"
    _write_private(key, key_pem)
    cert.write_bytes(chain)
    log.info(
        "ACME certificate obtained", extra={"domains": ",".join(cfg.domains), "renew_at": renew_at(chain)}
    )
    return cert, key


def _challenge_app(answers: Answers) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        answer = answers.get(path[len(_CHALLENGE_PREFIX) :]) if path.startswith(_CHALLENGE_PREFIX) else None
        status, body = (200, answer.encode()) if answer else (404, b"not found\n")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def _account_key(d: Path) -> Any:
    from josepy.jwk import JWKRSA

    path = d / "account.key"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(
            path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    assert isinstance(key, rsa.RSAPrivateKey)
    return JWKRSA(key=key)


def _order_sync(d: Path, cfg: ACMEConfig, answer: Callable[[str, str], None]) -> tuple[bytes, bytes]:
    """The blocking ACME conversation (a worker thread): (full chain PEM, key PEM)."""
    try:
        from acme import challenges, client, crypto_util, errors, messages
    except ImportError:
        raise ConfigError(
            "proxy_service.acme", "needs the acme package: pip install 'mcp-bastion[acme]'"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    names, ips = [], []
    for n in _normal(cfg.domains):
        try:
            ips.append(ipaddress.ip_address(n))
        except ValueError:
            names.append(n)
    csr = crypto_util.make_csr(key_pem, names, ipaddrs=ips)
    account_key = _account_key(d)
    net = client.ClientNetwork(account_key, user_agent=f"mcp-bastion/{__version__}")
    if cfg.ca_file is not None:
        # Passed to requests as `verify`, which takes a CA bundle path where acme types a bool.
        net.verify_ssl = str(cfg.ca_file)  # type: ignore[assignment]
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(cfg.directory_url, net), net)
        reg = messages.NewRegistration.from_data(email=cfg.email or None, terms_of_service_agreed=True)
        try:
            net.account = acme.new_account(reg)
        except errors.ConflictError as e:  # this key has an account already
            net.account = acme.query_registration(messages.RegistrationResource(uri=e.location))
        orderr = acme.new_order(csr)
        for authz in orderr.authorizations:
            chall = next((c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None)
            if chall is None:
                raise ACMEError(
                    f"the ACME server offers no HTTP-01 challenge for {authz.body.identifier.value}"
                )
            response, validation = chall.response_and_validation(account_key)
            answer(chall.chall.encode("token"), validation)
            acme.answer_challenge(chall, response)
        done = acme.poll_and_finalize(orderr, datetime.now() + _ORDER_TIMEOUT)
    except ACMEError:
        raise
    except Exception as e:  # requests, josepy and acme errors alike: one message, the ACME server's words
        raise ACMEError(f"ACME order at {cfg.directory_url} failed: {type(e).__name__}: {e}") from None
    if not done.fullchain_pem:
        raise ACMEError(f"ACME order at {cfg.directory_url} returned no certificate")
    return done.fullchain_pem.encode(), key_pem


async def renew_forever(
    data_dir: Path, cfg: ACMEConfig, cert: Path, on_renewed: Callable[[Path, Path], None]
) -> None:
    """Order a new certificate at two thirds of the current one's life; retry failures hourly."""
    due = renew_at(cert.read_bytes())
    while True:
        wait = (due - datetime.now(UTC)).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(wait, 3600.0))
            continue
        try:
            new_cert, new_key = await order(data_dir, cfg)
        except (ACMEError, ConfigError) as e:
            log.warning("ACME renewal failed; retrying in an hour", extra={"error": e.message})
            due = datetime.now(UTC) + timedelta(hours=1)
            continue
        try:
            on_renewed(new_cert, new_key)
        except (OSError, ssl.SSLError) as e:
            log.warning("cannot load the renewed ACME certificate", extra={"error": str(e)})
        due = renew_at(new_cert.read_bytes())
