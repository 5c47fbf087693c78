"""Helpers for the download tests: a hostile little web server on 127.0.0.1 for the download tests, with a log of every request.

Stdlib threaded HTTP server (not aiohttp, so the client is not tested against itself). Routes:
good images in several formats, HTTP errors, 429 with Retry-After, slow drip, endless and huge
bodies, redirect chains and loops, redirects to private / metadata addresses, X-Robots-Tag opt-out,
HTML served as image/jpeg, a truncated JPEG, pixel bombs, robots.txt, EXIF-rotated JPEG.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def make_image(fmt: str, size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    img = Image.new(mode, size, color)
    # some structure, so resizing and hashing see real content
    for x in range(0, size[0], 8):
        for y in range(size[1]):
            img.putpixel((x, y), (0, 0, 0) if mode == "RGB" else (0, 0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}[fmt])
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG declaring width x height; the body is tiny (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated_gif(frames: int, size=(500, 500)) -> bytes:
    imgs = [Image.new("P", size, i % 200) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=50, optimize=False)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says rotate 90 degrees (orientation 6): upright it is 20x40."""
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def self_signed_cert(folder) -> tuple[str, str]:
    """(cert.pem, key.pem) of a fresh self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    folder = Path(folder)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class Routes:
    def __init__(self):
        self.images = {
            "/img/a.jpg": (make_image("jpg", (640, 480)), "image/jpeg"),
            "/img/b.png": (make_image("png", (300, 200)), "image/png"),
            "/img/c.webp": (make_image("webp", (120, 90)), "image/webp"),
            "/img/d.gif": (make_image("gif", (50, 50)), "image/gif"),
            "/img/alpha.png": (make_image("png", (64, 64), (255, 0, 0, 0), "RGBA"), "image/png"),
            "/img/exif.jpg": (exif_rotated_jpeg(), "image/jpeg"),
            "/truncated.jpg": (make_image("jpg", (640, 480))[:2000], "image/jpeg"),
            "/html.jpg": (b"<html><body>not an image</body></html>" * 20, "image/jpeg"),
            "/bomb.png": (png_bomb(100_000, 100_000), "image/png"),
            "/bomb-anim.gif": (animated_gif(12), "image/gif"),
            "/private/secret.jpg": (make_image("jpg"), "image/jpeg"),
            "/blocked.jpg": (make_image("jpg"), "image/jpeg"),
        }
        self.flaky_left: dict[str, int] = {}
        self.retry_after_left: dict[str, int] = {}
        self.healthy = False  # /sometimes.jpg answers 503 until healed


class Server:
    def __init__(self, tls_dir=None):
        self.routes = Routes()
        self.log: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.inflight = 0  # /delay/ requests being answered now, and the most at once
        self.peak_inflight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, code, body=b"", ctype="text/plain", headers=()):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):  # noqa: C901 - a route table
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.log.append((time.monotonic(), path))
                r = server.routes
                try:
                    if path in r.images:
                        body, ctype = r.images[path]
                        return self.send(200, body, ctype)
                    if path == "/robots.txt":
                        return self.send(200, b"User-agent: *\nDisallow: /private/\n")
                    if path.startswith("/status/"):
                        return self.send(int(path.rsplit("/", 1)[1]), b"error")
                    if path.startswith("/flaky/"):  # 500 for the first N requests of this path
                        left = r.flaky_left.setdefault(path, int(path.rsplit("/", 1)[1]))
                        if left > 0:
                            r.flaky_left[path] = left - 1
                            return self.send(500, b"try again")
                        return self.send(200, r.images["/img/a.jpg"][0], "image/jpeg")
                    if path.startswith("/ratelimited/"):  # 429 Retry-After: N once, then the image
                        if r.retry_after_left.setdefault(path, 1) > 0:
                            r.retry_after_left[path] = 0
                            return self.send(429, b"slow down", headers=[("Retry-After", path.rsplit("/", 1)[1])])
                        return self.send(200, r.images["/img/b.png"][0], "image/png")
                    if path.startswith("/delay/"):  # answers after N ms
                        with server.lock:
                            server.inflight += 1
                            server.peak_inflight = max(server.peak_inflight, server.inflight)
                        try:
                            time.sleep(int(path.split("/")[2]) / 1000)
                        finally:
                            with server.lock:
                                server.inflight -= 1
                        return self.send(200, r.images["/img/c.webp"][0], "image/webp")
                    if path == "/sometimes.jpg":
                        if not r.healthy:
                            return self.send(503, b"down")
                        return self.send(200, r.images["/img/c.webp"][0], "image/webp")
                    if path == "/noai.jpg":
                        return self.send(200, r.images["/img/a.jpg"][0], "image/jpeg",
                                         [("X-Robots-Tag", "noindex, noai")])
                    if path == "/noai-otherbot.jpg":
                        return self.send(200, r.images["/img/a.jpg"][0], "image/jpeg",
                                         [("X-Robots-Tag", "otherbot: noai")])
                    if path.startswith("/redirect/"):
                        n = int(path.rsplit("/", 1)[1])
                        target = "/img/a.jpg" if n <= 1 else f"/redirect/{n - 1}"
                        return self.send(302, b"", headers=[("Location", target)])
                    if path == "/loop":
                        return self.send(301, b"", headers=[("Location", "/loop")])
                    if path == "/to-private":
                        return self.send(302, b"", headers=[("Location", "http://10.0.0.1/x.jpg")])
                    if path == "/to-metadata":
                        return self.send(302, b"", headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
                    if path == "/to-file":
                        return self.send(302, b"", headers=[("Location", "file:///etc/passwd")])
                    if path == "/slow.jpg":  # declares 1 MB, drips a byte every 0.2 s
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Content-Length", str(1 << 20))
                        self.end_headers()
                        for _ in range(1 << 20):
                            self.wfile.write(b"\xff")
                            self.wfile.flush()
                            time.sleep(0.2)
                        return None
                    if path == "/endless.jpg":  # no length, never ends
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        block = b"\0" * 65536
                        while True:
                            self.wfile.write(block)
                    if path == "/huge.jpg":  # declares 10 GB
                        self.send_response(200)
                        self.send_header("Content-Type", "image/jpeg")
                        self.send_header("Content-Length", str(10 * 1024**3))
                        self.end_headers()
                        self.wfile.write(b"\0" * 65536)
                        return None
                    return self.send(404, b"not found")
                except (BrokenPipeError, ConnectionResetError):
                    return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        scheme = "http"
        if tls_dir is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self_signed_cert(tls_dir))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        with self.lock:
            return [p for _, p in self.log]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
