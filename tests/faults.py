"""Fake HTTP servers for the faults that a real Prometheus cannot be made to produce on demand.

Every server listens on 127.0.0.1 on a port the kernel picks, runs in a daemon thread and records
what it received, so a test can check the requests as well as the client's reaction.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def vector_body(samples: list[tuple[dict[str, str], float, str]]) -> bytes:
    """Encode a Prometheus API success response of resultType vector."""
    result = [{"metric": labels, "value": [at, value]} for labels, at, value in samples]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()


OK_BODY = vector_body([({"instance": "node-a"}, 1700000000.0, "1")])


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = OK_BODY
    content_type: str = "application/json"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class ScriptedServer:
    """Send the next scripted reply for each request. Once the script ends, the last reply repeats."""

    replies: list[Reply] = field(default_factory=lambda: [Reply()])
    requests: list[RecordedRequest] = field(default_factory=list)
    tls_context: ssl.SSLContext | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _scripted_handler(self))
        self.httpd.daemon_threads = True
        if self.tls_context is not None:
            self.httpd.socket = self.tls_context.wrap_socket(self.httpd.socket, server_side=True)
        # A short poll interval keeps shutdown, and so every test that uses a server, fast.
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="scripted-server",
                                        daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            index = min(len(self.requests), len(self.replies)) - 1
            return self.replies[index]

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _scripted_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
            parts = urlsplit(self.path)
            recorded = RecordedRequest(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()))
            reply = server.next_reply(recorded)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        do_POST = do_GET

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keeps pytest output clean
            pass

    return Handler


class HungServer:
    """Accept connections and never respond, like a server stuck behind a full queue."""

    def __init__(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_forever, name="hung-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    @property
    def accepted(self) -> int:
        return len(self._held)

    def _accept_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            # Keep a reference so the socket stays open (and silent) until the test ends.
            self._held.append(connection)

    def __enter__(self) -> HungServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._listener.close()
        for connection in self._held:
            connection.close()


def refused_url() -> str:
    """Return a loopback URL on a port that was free a moment ago, so a connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def self_signed_certificate(folder: Path) -> Certificate | None:
    """Create a self-signed certificate for 127.0.0.1, with `cryptography` or the openssl CLI.

    Returns None when neither is available, so the caller can skip with that reason.
    """
    try:
        return _certificate_with_cryptography(folder)
    except ImportError:
        pass
    if shutil.which("openssl") is None:
        return None
    return _certificate_with_openssl(folder)


def _certificate_with_openssl(folder: Path) -> Certificate:
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key_file), "-out", str(cert_file)],
        check=True, capture_output=True)
    return Certificate(cert_file, key_file)


def _certificate_with_cryptography(folder: Path) -> Certificate:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Certificate(cert_file, key_file)
