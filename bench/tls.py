"""The benchmark's private CA (made by trustme): the agents' server certificates and the service's client one."""

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from app.agent.tls import server_ssl_context


@dataclass(frozen=True)
class BenchPki:
    """PEM files of one private CA, as an operator would set them up (docs/operations.md, mutual TLS)."""

    ca_file: Path
    agent_cert_file: Path
    agent_key_file: Path
    service_cert_file: Path
    service_key_file: Path

    def agent_context(self) -> ssl.SSLContext:
        """The agents' server context, built as `python -m app agent --tls-cert --tls-key --client-ca` builds it."""
        return server_ssl_context(self.agent_cert_file, self.agent_key_file, self.ca_file)

    def service_settings(self) -> dict[str, str]:
        """The service's environment for mutual TLS to the agents."""
        return {
            "AGENT_CA_FILE": str(self.ca_file),
            "AGENT_CERT_FILE": str(self.service_cert_file),
            "AGENT_KEY_FILE": str(self.service_key_file),
        }


def make_pki(directory: Path) -> BenchPki:
    """A CA, a certificate for agents on 127.0.0.1 and a client certificate for the service, under `directory`."""
    ca = trustme.CA()
    agent = ca.issue_cert("127.0.0.1")
    service = ca.issue_cert("vtpm-cleanup-service")
    pki = BenchPki(
        ca_file=directory / "ca.pem",
        agent_cert_file=directory / "agent.crt",
        agent_key_file=directory / "agent.key",
        service_cert_file=directory / "service.crt",
        service_key_file=directory / "service.key",
    )
    ca.cert_pem.write_to_path(pki.ca_file)
    agent.cert_chain_pems[0].write_to_path(pki.agent_cert_file)
    agent.private_key_pem.write_to_path(pki.agent_key_file)
    service.cert_chain_pems[0].write_to_path(pki.service_cert_file)
    service.private_key_pem.write_to_path(pki.service_key_file)
    return pki
