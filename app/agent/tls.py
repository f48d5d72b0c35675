"""The agent's TLS: the server context that `--tls-cert`, `--tls-key` and `--client-ca` describe.

With a client CA the agent is the mutual-TLS peer that OpenStack's security guide asks for (`verify_peer`,
`fail_if_no_peer_cert`): the handshake fails for a client without a certificate, or with one that this CA did not
sign, before any request is read. Only the given CA is trusted for clients, never the system's CAs.
"""

import argparse
import ssl
from pathlib import Path

from app.protocol import describe_file_error


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used, with the option that named it."""


def add_tls_options(options: argparse.ArgumentParser) -> None:
    """Add `--tls-cert`, `--tls-key` and `--client-ca` to the agent's command line."""
    options.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) to serve with: HTTPS only")
    options.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    options.add_argument(
        "--client-ca",
        type=Path,
        help="PEM CA bundle: serve only clients whose certificate it signed (mutual TLS; needs --tls-cert)",
    )


def ssl_context_from_options(options: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context the parsed options ask for, or None for plain HTTP; TlsFileError says what is wrong."""
    if (options.tls_cert is None) != (options.tls_key is None):
        raise TlsFileError("--tls-cert and --tls-key go together")
    if options.tls_cert is None:
        if options.client_ca is not None:
            raise TlsFileError("--client-ca needs --tls-cert and --tls-key")
        return None
    cert_file: Path = options.tls_cert
    key_file: Path = options.tls_key
    client_ca_file: Path | None = options.client_ca
    return server_ssl_context(cert_file, key_file, client_ca_file)


def server_ssl_context(cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> ssl.SSLContext:
    """The context the agent serves HTTPS with; with `client_ca_file`, clients must show a certificate it signed."""
    # PROTOCOL_TLS_SERVER, not create_default_context(CLIENT_AUTH): the latter would also trust the system's CAs
    # for client certificates when no CA file is given to it.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise TlsFileError(f"--tls-cert {cert_file} / --tls-key {key_file}: {describe_file_error(error)}") from None
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise TlsFileError(f"--client-ca {client_ca_file}: {describe_file_error(error)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
