"""utils.download against a local HTTP server: cache, hashes, cut connections, Drive confirmation pages."""
import hashlib
import http.server
import socket
import threading
import urllib.parse

import pytest

from utils import download as dl

PAYLOAD = bytes(range(256)) * 4096 + b"tail"          # ~1 MiB, more than one read chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    requests = []           # paths seen, shared by the test and the server thread

    def log_message(self, *args):
        pass

    def _send_file(self, data, filename=None, length=None, cut_at=None):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        if filename:
            self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.end_headers()
        self.wfile.write(data if cut_at is None else data[:cut_at])
        if cut_at is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_html(self, text, cookie=None):
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.requests.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path.startswith("/files/"):
            self._send_file(PAYLOAD)
        elif url.path.startswith("/cut/"):
            self._send_file(PAYLOAD, cut_at=len(PAYLOAD) // 3)
        elif url.path == "/uc-new":           # drive.google.com/uc -> virus-scan warning form
            self._send_html(
                "<html><head><title>Google Drive - Virus scan warning</title></head><body>"
                '<form id="download-form" action="/usercontent/download" method="get">'
                '<input type="submit" value="Download anyway"/>'
                f'<input type="hidden" name="id" value="{query["id"][0]}">'
                '<input type="hidden" name="export" value="download">'
                '<input type="hidden" name="confirm" value="t">'
                '<input type="hidden" name="uuid" value="0f9e-uuid"></form></body></html>')
        elif url.path == "/usercontent/download":
            if query.get("confirm") == ["t"] and query.get("uuid") == ["0f9e-uuid"]:
                self._send_file(PAYLOAD, filename="ccnet_drive_new.pth")
            else:
                self._send_html("<html><title>bad confirmation</title></html>")
        elif url.path == "/uc-old":
            if query.get("confirm") == ["Xy_1"]:
                self._send_file(PAYLOAD, filename="ccnet_drive_old.pth")
            else:
                self._send_html(
                    "<html><body>Google Drive can't scan this file for viruses. "
                    f'<a id="uc-download-link" href="/uc-old?export=download&amp;confirm=Xy_1&amp;id={query["id"][0]}">'
                    "Download anyway</a></body></html>",
                    cookie="download_warning_13058876669334088843_abc=Xy_1; Path=/")
        elif url.path == "/login":
            self._send_html("<html><head><title>Sign in - Google Accounts</title></head></html>")
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CCNET_HOME", str(tmp_path))
    Handler.requests.clear()
    return tmp_path / "checkpoints"


def cached_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_then_cache_hit_without_a_second_request(server, home):
    path = dl.download(f"{server}/files/weights.pth", sha256=PAYLOAD_SHA, progress=False)
    assert path == home / "weights.pth" and path.read_bytes() == PAYLOAD
    assert Handler.requests == ["/files/weights.pth"]
    again = dl.download(f"{server}/files/weights.pth", sha256=PAYLOAD_SHA, progress=False)
    assert again == path and Handler.requests == ["/files/weights.pth"]    # served from the cache
    assert cached_files(home) == ["weights.pth"]                            # no temp files left


def test_hash_prefix_is_accepted_and_checked(server, home):
    assert dl.download(f"{server}/files/a.pth", sha256=PAYLOAD_SHA[:8], progress=False).is_file()
    with pytest.raises(ValueError, match="at least 8 hex"):
        dl.download(f"{server}/files/b.pth", sha256="abc", progress=False)


def test_hash_mismatch_raises_and_caches_nothing(server, home):
    wrong = "0" * 64
    with pytest.raises(dl.DownloadError, match=f"SHA-256 mismatch.*expected {wrong}, got {PAYLOAD_SHA}"):
        dl.download(f"{server}/files/evil.pth", sha256=wrong, progress=False)
    assert cached_files(home) == []


def test_corrupt_cached_file_is_downloaded_again(server, home):
    home.mkdir(parents=True)
    (home / "weights.pth").write_bytes(b"truncated")
    path = dl.download(f"{server}/files/weights.pth", sha256=PAYLOAD_SHA, progress=False)
    assert path.read_bytes() == PAYLOAD and len(Handler.requests) == 1


def test_connection_cut_mid_file_leaves_no_partial_file(server, home):
    with pytest.raises(dl.DownloadError, match="cut after"):
        dl.download(f"{server}/cut/weights.pth", progress=False)       # no hash: length check alone
    assert cached_files(home) == []


def test_offline_is_a_clear_error(home):
    with socket.socket() as sock:           # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(dl.DownloadError, match="cannot reach 127.0.0.1.*offline"):
        dl.download(f"http://127.0.0.1:{port}/files/weights.pth", progress=False)
    assert cached_files(home) == []


def test_http_error_names_the_url(server, home):
    with pytest.raises(dl.DownloadError, match=r"/files-missing/x.pth: HTTP 404"):
        dl.download(f"{server}/files-missing/x.pth", progress=False)


def test_drive_confirmation_form_with_uuid(server, home):
    path = dl.download(f"{server}/uc-new?export=download&id=FILEID", sha256=PAYLOAD_SHA, progress=False)
    assert path == home / "ccnet_drive_new.pth" and path.read_bytes() == PAYLOAD
    assert Handler.requests[1].startswith("/usercontent/download?") and "uuid=0f9e-uuid" in Handler.requests[1]


def test_drive_confirmation_old_token_link(server, home):
    path = dl.download(f"{server}/uc-old?export=download&id=FILEID", filename="old.pth", progress=False)
    assert path == home / "old.pth" and path.read_bytes() == PAYLOAD
    assert len(Handler.requests) == 2 and "confirm=Xy_1" in Handler.requests[1]


def test_html_page_instead_of_a_file_is_an_error(server, home):
    with pytest.raises(dl.DownloadError, match="HTML page instead of a file.*Sign in"):
        dl.download(f"{server}/login", filename="x.pth", progress=False)
    assert cached_files(home) == []


def test_confirmation_from_cookie_only():
    url = dl.confirmation_url("<html>no link</html>", "https://drive.google.com/uc?export=download&id=A",
                              [("download_warning_123", "TOK")])
    assert url == "https://drive.google.com/uc?export=download&id=A&confirm=TOK"


@pytest.mark.parametrize("link", [
    "https://drive.google.com/file/d/1IxXm8qxKmfDPVRtT8uuDNEvSQsNVTfLC/view?usp=sharing",
    "https://drive.google.com/open?id=1IxXm8qxKmfDPVRtT8uuDNEvSQsNVTfLC",
    "https://drive.google.com/uc?id=1IxXm8qxKmfDPVRtT8uuDNEvSQsNVTfLC&export=download",
])
def test_drive_share_links_become_direct_downloads(link):
    assert dl.direct_url(link) == "https://drive.google.com/uc?export=download&id=1IxXm8qxKmfDPVRtT8uuDNEvSQsNVTfLC"


def test_other_links_are_left_alone():
    url = "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth"
    assert dl.direct_url(url) == url and dl.drive_file_id(url) is None
