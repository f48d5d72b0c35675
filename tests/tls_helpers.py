"""Test CAs and certificates made by trustme, written out as the PEM files the agent and the service are given."""

import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

import trustme

from devtools.local_stack import AgentTls

# The name the agents are called by in the tests: their URLs are http(s)://127.0.0.1:PORT.
AGENT_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its key, as PEM files."""

    cert_file: Path
    key_file: Path


class PrivateCa:
    """A private CA in a folder of its own: its certificate as a PEM file, and the certificates it issues."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_file)

    def issue(self, *identities: str) -> IssuedCert:
        """A certificate for these names (or IP addresses), with its key, written to fresh files."""
        cert = self.ca.issue_cert(*identities)
        stem = self.directory / uuid.uuid4().hex
        issued = IssuedCert(Path(f"{stem}.crt"), Path(f"{stem}.key"))
        # The leaf first, then any intermediates: what load_cert_chain expects.
        issued.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(issued.key_file)
        return issued

    def client_context(self, client: IssuedCert | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA, and shows `client` when given."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if client is not None:
            context.load_cert_chain(client.cert_file, client.key_file)
        return context


def agent_tls(ca: PrivateCa, *, client_ca: PrivateCa | None, name: str = AGENT_ADDRESS) -> AgentTls:
    """What an agent needs to serve HTTPS with a certificate for `name` that `ca` signed; with `client_ca`, mutual
    TLS (the readiness probe then shows a client certificate of that CA)."""
    served = ca.issue(name)
    probe = ca.client_context(client_ca.issue("readiness-probe") if client_ca else None)
    # The probe only asks whether the agent is up: it trusts the agent's certificate whatever name it carries.
    probe.check_hostname = False
    return AgentTls(served.cert_file, served.key_file, client_ca.ca_file if client_ca else None, probe_context=probe)
