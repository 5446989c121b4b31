"""Certificate authorities of a cluster, created at first start and kept in the backend.

Three CAs, each a purpose of its own so that a key stolen for one purpose is
useless for another:

* ``host`` — an X.509 CA (ECDSA P-256).  Signs the proxy's TLS certificate
  (when none is configured) and, later, the host certificates of app services.
  Its certificate is what clients pin on first login.
* ``user`` — an Ed25519 key.  Signs user credentials (``bastion.auth.credentials``).
* ``jwt``  — an ECDSA P-256 key.  Signs the short-lived JWTs sent to upstream MCP
  servers (ES256); its public half is published at ``/.well-known/jwks.json``.

Private keys live only in the backend and in memory.  They are never printed,
logged, or returned by any API; ``CertAuthority.__repr__`` hides them.
This module does no I/O except through the ``Backend`` it is handed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.auth.scope import SCOPE_OID, HostScope
from bastion.backend import Backend, Item
from bastion.errors import AlreadyExistsError, NotFoundError

CA_TYPES = ("host", "user", "jwt")
_CA_VALIDITY = timedelta(days=3650)


def _key_id(public_der: bytes) -> str:
    return hashlib.sha256(public_der).hexdigest()[:16]


def fingerprint(cert_pem: bytes) -> str:
    """``SHA256:<base64>`` of a certificate's DER, the form shown to users to verify."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class CertAuthority:
    """One CA: its type, its key (PEM, private) and, for ``host``, its certificate."""

    type: str
    cluster_name: str
    key_id: str
    private_key_pem: bytes = field(repr=False)
    public_key_pem: bytes
    cert_pem: bytes = b""

    def private_key(self) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
        key = _load_private_key(self.private_key_pem)
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise TypeError(f"unexpected key type for the {self.type} CA")
        return key

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "type": self.type,
                "cluster_name": self.cluster_name,
                "key_id": self.key_id,
                "private_key_pem": self.private_key_pem.decode(),
                "public_key_pem": self.public_key_pem.decode(),
                "cert_pem": self.cert_pem.decode(),
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> CertAuthority:
        d = orjson.loads(data)
        return cls(
            type=d["type"],
            cluster_name=d["cluster_name"],
            key_id=d["key_id"],
            private_key_pem=d["private_key_pem"].encode(),
            public_key_pem=d["public_key_pem"].encode(),
            cert_pem=d.get("cert_pem", "").encode(),
        )


@functools.lru_cache(maxsize=16)
def _load_private_key(pem: bytes) -> object:
    # Parsing a PEM key costs more than the signature it is used for (15 % of a
    # session set-up in the benchmarks); CA keys are few and long-lived.
    return serialization.load_pem_private_key(pem, password=None)


def _pem_private(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> tuple[bytes, bytes]:
    pub = key.public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, der


def generate_ca(ca_type: str, cluster_name: str, now: datetime) -> CertAuthority:
    """A fresh CA of ``ca_type`` for ``cluster_name``."""
    if ca_type not in CA_TYPES:
        raise ValueError(f"unknown CA type {ca_type!r}")
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    key = (
        ed25519.Ed25519PrivateKey.generate() if ca_type == "user" else ec.generate_private_key(ec.SECP256R1())
    )
    pub_pem, pub_der = _pem_public(key)
    cert_pem = b""
    if ca_type == "host":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} host CA"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + _CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    return CertAuthority(
        type=ca_type,
        cluster_name=cluster_name,
        key_id=_key_id(pub_der),
        private_key_pem=_pem_private(key),
        public_key_pem=pub_pem,
        cert_pem=cert_pem,
    )


def ca_key(ca_type: str) -> str:
    return f"/cert_authorities/{ca_type}"


async def ensure_cas(backend: Backend, cluster_name: str, now: datetime) -> dict[str, CertAuthority]:
    """Load the cluster's CAs, creating any that are missing.

    Safe when several processes start at once: ``create`` lets exactly one
    win, and the losers read the winner's CA.
    """
    out: dict[str, CertAuthority] = {}
    for ca_type in CA_TYPES:
        try:
            item = await backend.get(ca_key(ca_type))
        except NotFoundError:
            ca = generate_ca(ca_type, cluster_name, now)
            try:
                item = await backend.create(Item(ca_key(ca_type), ca.to_json()))
            except AlreadyExistsError:
                item = await backend.get(ca_key(ca_type))
        out[ca_type] = CertAuthority.from_json(item.value)
    return out


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def issue_server_cert(
    host_ca: CertAuthority, *, hosts: list[str], now: datetime, ttl: timedelta = timedelta(days=365)
) -> IssuedCert:
    """A TLS server certificate for ``hosts`` (DNS names or IPs), signed by the host CA."""
    ca_cert = x509.load_pem_x509_certificate(host_ca.cert_pem)
    ca_priv = host_ca.private_key()
    assert isinstance(ca_priv, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + ttl, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_priv.public_key()), critical=False
        )
        .sign(ca_priv, hashes.SHA256())
    )
    return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _pem_private(key))


# ------------------------------------------------------------ host identities

#: Roles a host certificate can carry (its subject's OU).
HOST_ROLES = ("app", "proxy")


@dataclass(frozen=True)
class HostIdentity:
    """Who a verified host certificate belongs to."""

    host_id: str
    role: str
    cluster_name: str
    hostname: str
    expires: datetime
    #: What the host may serve (from its join token); empty = anything.
    scope: HostScope = field(default_factory=HostScope)


def issue_host_cert(
    host_ca: CertAuthority,
    *,
    public_key_pem: bytes,
    host_id: str,
    role: str,
    hostname: str,
    now: datetime,
    ttl: timedelta,
    dns_names: list[str] | None = None,
    scope: HostScope | None = None,
) -> bytes:
    """A host certificate for a public key the host made itself (its private key never travels).

    Subject: ``O=<cluster>, OU=<role>, CN=<host_id>`` and the host's name as
    ``pseudonym``; usable for TLS client and server
    authentication between cluster components only (mTLS over the tunnel).
    A restricted ``scope`` (what the host may serve) goes into a non-critical
    extension (``bastion.auth.scope.SCOPE_OID``), signed with the rest.
    """
    if role not in HOST_ROLES:
        raise ValueError(f"unknown host role {role!r}")
    pub = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(pub, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("the host key must be an ECDSA or Ed25519 public key")
    ca_cert = x509.load_pem_x509_certificate(host_ca.cert_pem)
    ca_priv = host_ca.private_key()
    assert isinstance(ca_priv, ec.EllipticCurvePrivateKey)
    sans: list[x509.GeneralName] = [x509.DNSName(host_id)]
    for h in dns_names or ():
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, host_ca.cluster_name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.PSEUDONYM, hostname[:64] or host_id),
                    x509.NameAttribute(NameOID.COMMON_NAME, host_id),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + ttl, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_priv.public_key()), critical=False
        )
    )
    if scope is not None and not scope.unrestricted:
        oid = x509.ObjectIdentifier(SCOPE_OID)
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, scope.to_json()), critical=False)
    cert = builder.sign(ca_priv, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def host_identity(cert: x509.Certificate) -> HostIdentity:
    """The identity in a host certificate whose chain TLS has already verified."""

    def attr(oid: x509.ObjectIdentifier) -> str:
        got = cert.subject.get_attributes_for_oid(oid)
        value = got[0].value if got else ""
        return value if isinstance(value, str) else value.decode()

    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SCOPE_OID)).value
        assert isinstance(ext, x509.UnrecognizedExtension)
        scope = HostScope.from_json(ext.value)
    except x509.ExtensionNotFound:
        scope = HostScope()
    return HostIdentity(
        host_id=attr(NameOID.COMMON_NAME),
        role=attr(NameOID.ORGANIZATIONAL_UNIT_NAME),
        cluster_name=attr(NameOID.ORGANIZATION_NAME),
        hostname=attr(NameOID.PSEUDONYM),
        expires=cert.not_valid_after_utc,
        scope=scope,
    )


def new_host_key() -> tuple[bytes, bytes]:
    """A fresh host key pair (private PEM, public PEM); the private half stays on the host."""
    key = ec.generate_private_key(ec.SECP256R1())
    pub_pem, _ = _pem_public(key)
    return _pem_private(key), pub_pem
