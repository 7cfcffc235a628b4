"""Download files into a local cache: progress bar, SHA-256 check, atomic rename, Google Drive.

``download(url, sha256=None)`` returns the path of the cached file. The cache lives in
``$CCNET_HOME/checkpoints`` (default ``~/.cache/ccnet-jittor/checkpoints``). A download is written
to a temporary file in the cache folder and renamed to its final name only once it is complete and
its hash matches, so an interrupted or corrupt download never masquerades as a cached file.

Google Drive share links (``/file/d/<id>/view``, ``open?id=<id>``, ``uc?id=<id>``) are rewritten
to the direct-download endpoint. Large Drive files answer with an HTML "can't scan this file for
viruses" page first; both of its styles are handled: the older one (a ``confirm=<token>`` link or a
``download_warning`` cookie) and the newer one (a form posting ``id``/``confirm``/``uuid`` to
drive.usercontent.google.com). Any other HTML page where a file was expected is an error, not a
cached "checkpoint".
"""
import hashlib
import html
import http.cookiejar
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable

CHUNK = 1 << 20
USER_AGENT = "ccnet-jittor (python urllib)"
DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
MAX_CONFIRM_STEPS = 3       # Drive needs one confirmation; more means we are going in circles


class DownloadError(RuntimeError):
    """A download failed; nothing was written to the cache."""


def ccnet_home() -> Path:
    """Root of everything ccnet-jittor caches: ``$CCNET_HOME`` or ``~/.cache/ccnet-jittor``."""
    return Path(os.environ.get("CCNET_HOME") or Path.home() / ".cache" / "ccnet-jittor").expanduser()


def cache_dir(subdir: str = "checkpoints") -> Path:
    """The cache folder for downloads (created on demand)."""
    path = ccnet_home() / subdir
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_matches(actual: str, expected: str | None) -> bool:
    """``expected`` is a full SHA-256 or a published prefix of one (torch.hub / OpenMMLab file names
    carry the first 8 hex digits); shorter than 8 digits would check next to nothing."""
    expected = expected.lower().strip()
    if len(expected) < 8 or not re.fullmatch(r"[0-9a-f]+", expected):
        raise ValueError(f"expected SHA-256 {expected!r} must be at least 8 hex digits")
    return actual.lower().startswith(expected)


# ---------------------------------------------------------------- Google Drive links

def drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive share/download link, or None for other URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in DRIVE_HOSTS:
        return None
    match = re.search(r"/file/d/([0-9A-Za-z_-]+)", parts.path)
    if match:
        return match.group(1)
    ids = urllib.parse.parse_qs(parts.query).get("id")
    return ids[0] if ids else None


def direct_url(url: str) -> str:
    """Rewrite a Drive share link to its direct-download form; other URLs are returned unchanged."""
    file_id = drive_file_id(url)
    if file_id is None:
        return url
    return f"https://drive.google.com/uc?export=download&id={file_id}"


class _FormParser(HTMLParser):
    """Collects <form action=...> with its <input name=... value=...> fields, and all hrefs."""

    def __init__(self):
        super().__init__()
        self.forms, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append({"action": attrs.get("action") or "", "fields": {}})
        elif tag == "input" and self.forms and attrs.get("name"):
            self.forms[-1]["fields"][attrs["name"]] = attrs.get("value") or ""
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def confirmation_url(page: str, page_url: str, cookies: Iterable = ()) -> str | None:
    """The URL that confirms a large-file download on a Drive warning page, or None.

    ``page``: the HTML text; ``page_url``: where it came from (relative links resolve against it);
    ``cookies``: (name, value) pairs set by the page's response.
    """
    parser = _FormParser()
    parser.feed(page)
    for form in parser.forms:       # new style: <form action=".../download"> + hidden uuid/confirm
        if "confirm" in form["fields"] or "uuid" in form["fields"]:
            action = urllib.parse.urljoin(page_url, html.unescape(form["action"]) or page_url)
            return f"{action}?{urllib.parse.urlencode(form['fields'])}"
    for href in parser.links:       # old style: <a href="/uc?export=download&confirm=XXXX&id=...">
        href = html.unescape(href)
        if "confirm=" in href:
            return urllib.parse.urljoin(page_url, href)
    match = re.search(r"confirm=([0-9A-Za-z_-]+)", page)   # token only inside a script
    token = match.group(1) if match else None
    for name, value in cookies:     # old style: token in a download_warning cookie
        if name.startswith("download_warning"):
            token = value
    if token:
        sep = "&" if urllib.parse.urlsplit(page_url).query else "?"
        return f"{page_url}{sep}confirm={token}"
    return None


# ---------------------------------------------------------------- the download itself

def _filename_from(response, url):
    disposition = response.headers.get("Content-Disposition") or ""
    match = re.search(r"filename\*=UTF-8''([^;]+)", disposition) or re.search(r'filename="?([^";]+)"?', disposition)
    name = urllib.parse.unquote(match.group(1)) if match else Path(urllib.parse.urlsplit(url).path).name
    return os.path.basename(name.strip()) or None


def _open(opener, url, timeout):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}): are you offline?") from err


def _open_file_response(url, timeout):
    """Open ``url``, stepping through a Drive confirmation page if one comes first.

    Returns (response, final_url). An HTML page that is not a confirmation page is an error.
    """
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    current = url
    for _ in range(MAX_CONFIRM_STEPS + 1):
        response = _open(opener, current, timeout)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/html") or response.headers.get("Content-Disposition"):
            return response, current
        with response:
            page = response.read(4 << 20).decode("utf-8", "replace")
        next_url = confirmation_url(page, response.geturl(), [(c.name, c.value) for c in jar])
        if next_url is None or next_url == current:
            title = re.search(r"<title>(.*?)</title>", page, re.S | re.I)
            hint = f" (page title: {html.unescape(title.group(1)).strip()!r})" if title else ""
            raise DownloadError(
                f"{url} returned an HTML page instead of a file{hint}. For Google Drive this usually "
                "means the file is private, was removed, or hit its download quota: open the link in a "
                "browser, save the file, and pass its local path instead.")
        current = next_url
    raise DownloadError(f"{url}: still getting confirmation pages after {MAX_CONFIRM_STEPS} steps")


def download(url: str, filename: str | None = None, sha256: str | None = None,
             directory: str | os.PathLike | None = None, progress: bool = True, timeout: float = 60) -> Path:
    """Download ``url`` into the cache (or ``directory``) and return the file's Path.

    ``filename``: name in the cache (default: from the server or the URL). ``sha256``: full hash or
    a >= 8-digit prefix; when given, a cached file is only reused if it matches and a fresh download
    is only kept if it matches. Raises DownloadError when offline, on HTTP errors, on a cut
    connection and on a hash mismatch; in every case no partial file stays behind.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    source = direct_url(url)
    if filename is None and drive_file_id(url) is None:
        # a URL ending in a file name (".../resnet101-63fe2227.pth") names the cached file up front,
        # so a cache hit needs no request; otherwise the server's Content-Disposition decides
        name = Path(urllib.parse.urlsplit(source).path).name
        filename = name if "." in name.strip(".") else None
    if filename is not None:
        cached = _reuse_cached(directory / filename, sha256)
        if cached is not None:
            return cached

    response, final_url = _open_file_response(source, timeout)
    with response:
        filename = filename or _filename_from(response, final_url) or f"drive-{drive_file_id(url)}"
        target = directory / filename
        cached = _reuse_cached(target, sha256)      # Drive: name known only now
        if cached is not None:
            return cached
        tmp = _fetch_to_temp(response, directory, filename, url, progress)
    try:
        if sha256 is not None:
            actual = sha256_of(tmp)
            if not hash_matches(actual, sha256):
                raise DownloadError(
                    f"SHA-256 mismatch for {url}: expected {sha256}, got {actual}. The file was not "
                    "cached; the download may be corrupt or the file was changed upstream.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _reuse_cached(path, sha256):
    if not path.is_file():
        return None
    if sha256 is None or hash_matches(sha256_of(path), sha256):
        return path
    print(f"cached {path} does not match SHA-256 {sha256}: downloading it again")
    return None


def _fetch_to_temp(response, directory, filename, url, progress):
    """Stream the body into a temp file next to the target; returns its path. Removes it on failure."""
    from tqdm import tqdm
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=directory)
    received = 0
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                               desc=filename, disable=not progress, leave=False) as bar:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as err:   # IncompleteRead, reset, timeout
                    raise DownloadError(f"connection to {urllib.parse.urlsplit(url).netloc} was cut "
                                        f"after {received} bytes of {total or '?'}: {err}") from err
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and received != total:
            raise DownloadError(f"connection to {urllib.parse.urlsplit(url).netloc} was cut after "
                                f"{received} of {total} bytes; nothing was cached, try again")
        return tmp
    except BaseException:
        os.unlink(tmp)
        raise
