"""Security promises, each checked: no unpickling anywhere, TLS verified on HTTP feeds, a feed URL's
credentials never shown, and nothing secret in MLflow params, tags or artifacts."""
from __future__ import annotations

import datetime
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon.config import FeedConfig, load_config
from daemon.cycle import run_cycle
from daemon.feeds import FeedError, enqueue, pull_http
from daemon.runtime import Runtime
from decision_helpers import ACCEPT_ALL, FACTS, make_decision_home
from store.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
UNPICKLING = re.compile(r"\bpickle\.loads?\(|\bjoblib\.load\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only=True)")


def test_no_module_unpickles() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{number}: {text.strip()}"
                 for folder in ("daemon", "editors", "policies", "store", "bench")
                 for path in (ROOT / folder).rglob("*.py")
                 for number, text in enumerate(path.read_text().splitlines(), 1) if UNPICKLING.search(text)]
    assert offenders == []


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_an_http_feed_with_an_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = b'{"id": "t1", "prompt": "The sky is", "target_new": "green"}\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    cert, key = self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        feed = FeedConfig(name="tls", kind="http", url=f"https://127.0.0.1:{server.server_address[1]}/feed")
        with pytest.raises(FeedError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            pull_http(feed, ledger, None)
        assert ledger.counts()["pending"] == 0
    finally:
        ledger.close()
        server.shutdown()


def test_a_feed_urls_credentials_never_appear_in_its_errors(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        feed = FeedConfig(name="private", kind="http", url="http://reader:pa55word@127.0.0.1:9/feed?token=t0k3n-abc&x=1",
                          timeout_s=2)
        with pytest.raises(FeedError) as caught:
            pull_http(feed, ledger, None)
    finally:
        ledger.close()
    message = str(caught.value)
    assert "127.0.0.1:9" in message and "unreachable" in message
    assert "pa55word" not in message and "t0k3n-abc" not in message


def test_mlflow_runs_hold_no_secret(tmp_path: Path, data_root) -> None:
    secret = "sup3r-s3cret-t0ken"
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    home.config_path.write_text(home.config_path.read_text().replace("token: null", f'token: "{secret}"'))
    rt = Runtime.open(home, load_config(home))
    try:
        enqueue(rt.records.versions.ledger, FACTS[:1], "test")
        report = run_cycle(rt)
        client = rt.records.mlflow
        [run_id] = [step.run_id for step in report.steps]
        run = client.get_run(run_id)
        shown = [*run.data.params.items(), *run.data.tags.items()]
        for artifact in client.list_artifacts(run_id):
            shown.append((artifact.path, Path(client.download_artifacts(run_id, artifact.path, str(tmp_path))).read_text()))
    finally:
        rt.close()
    assert shown and not [key for key, value in shown if secret in str(value)]
