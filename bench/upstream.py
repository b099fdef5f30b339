"""The upstream side of the benchmark: nginx serving fixed endpoints, and redis.

nginx is the upstream because it is far faster than any Python proxy, so what the
benchmark measures is the proxy in front of it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import procs

MIB = 1024 * 1024
SMALL_FILE_BYTES = 50 * MIB
LARGE_FILE_BYTES = 500 * MIB
SMALL_BODY = ("pollguard benchmark small response " * 8)[:199] + "\n"  # ~200 B
TEXT_REPEATS = 400  # ~20 KiB of compressible text for the gzip checks
RETRY_AFTER_SECONDS = 2
KEEPALIVE_CONNECTIONS = 64
GENERATE_CHUNK = 4 * MIB


@dataclass(frozen=True)
class UpstreamFiles:
    www: Path
    text: bytes
    small_file: Path
    large_file: Path


def _generate(path: Path, size: int) -> None:
    """Deterministic, incompressible-ish content so Range slices can be compared."""
    if path.exists() and path.stat().st_size == size:
        return
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        written, counter = 0, 0
        while written < size:
            block = hashlib.sha256(counter.to_bytes(8, "big")).digest() * (GENERATE_CHUNK // 32)
            block = block[: size - written]
            out.write(block)
            written += len(block)
            counter += 1
    tmp.replace(path)


def prepare_files(work: Path) -> UpstreamFiles:
    www = work / "www"
    (www / "files").mkdir(parents=True, exist_ok=True)
    text = "".join(
        f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(TEXT_REPEATS)
    )
    (www / "text").write_text(text)
    small_file = www / "files" / "50m.bin"
    large_file = www / "files" / "500m.bin"
    _generate(small_file, SMALL_FILE_BYTES)
    _generate(large_file, LARGE_FILE_BYTES)
    for path in [work, www, www / "files", *www.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # nginx workers may run as nobody
    return UpstreamFiles(www=www, text=text.encode(), small_file=small_file, large_file=large_file)


def _common_http(work: Path, name: str) -> str:
    tmp = work / "nginx-tmp" / name
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o777)
    return f"""
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    default_type application/octet-stream;
"""


def _main_block(work: Path, name: str) -> str:
    return f"""
daemon off;
worker_processes 1;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
"""


def upstream_config(work: Path, files: UpstreamFiles, port: int, name: str = "upstream") -> str:
    return (
        _main_block(work, name)
        + f"""
http {{
{_common_http(work, name)}
    server {{
        listen 127.0.0.1:{port};
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.rstrip()}\\n"; }}
        location /pending/ {{
            add_header Retry-After {RETRY_AFTER_SECONDS} always;
            default_type application/json;
            return 202 '{{"status":"pending"}}';
        }}
        location /open/ {{
            add_header Retry-After {RETRY_AFTER_SECONDS} always;
            default_type application/json;
            return 202 '{{"status":"pending"}}';
        }}
        location /prepare/ {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location /files/ {{ root {files.www}; }}
        location = /text {{
            root {files.www};
            default_type text/plain;
            gzip on;
            gzip_types text/plain;
            gzip_min_length 0;
            gzip_proxied any;
            gzip_http_version 1.0;
        }}
        location = /cookies {{
            add_header Set-Cookie "theme=dark; Path=/" always;
            add_header Set-Cookie "session=alice-secret; Path=/; HttpOnly" always;
            default_type text/plain;
            return 200 "two cookies\\n";
        }}
        location = /echo-cookie {{ default_type text/plain; return 200 "cookie=[$http_cookie]\\n"; }}
        location = /redirect {{ return 302 /small; }}
    }}
}}
"""
    )


def nginx_proxy_config(work: Path, listen_port: int, upstream_port: int) -> str:
    # WebSockets as nginx's documentation proxies them: Upgrade passed on, `Connection: upgrade`
    # for an upgrade and none otherwise, so plain HTTP keeps its upstream keepalive.
    return (
        _main_block(work, "nginx-proxy")
        + f"""
http {{
{_common_http(work, "nginx-proxy")}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive {KEEPALIVE_CONNECTIONS};
    }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""
    )


def nginx_argv(work: Path, name: str, config_text: str) -> list[str]:
    conf = work / f"{name}.conf"
    conf.write_text(config_text)
    return ["nginx", "-p", str(work), "-e", str(work / f"{name}-error.log"), "-c", str(conf)]


def start_upstream(
    work: Path, files: UpstreamFiles, name: str = "upstream", pin: bool = True
) -> tuple[subprocess.Popen[bytes], int]:
    """The nginx upstream on the load core; `pin=False` for unpinned runs (another `name`)."""
    port = procs.free_port()
    argv = nginx_argv(work, name, upstream_config(work, files, port, name))
    proc = procs.start(
        procs.pinned(procs.LOAD_CORE, argv) if pin else argv, log=work / "logs" / f"{name}.log"
    )
    procs.wait_for_port(port, proc)
    return proc, port


def start_redis(work: Path, name: str = "redis") -> tuple[subprocess.Popen[bytes], int]:
    port = procs.free_port()
    argv = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(work),
    ]
    proc = procs.start(procs.pinned(procs.LOAD_CORE, argv), log=work / "logs" / f"{name}.log")
    procs.wait_for_port(port, proc)
    return proc, port


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=os.environ)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "n/a"
