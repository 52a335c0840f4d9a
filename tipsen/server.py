"""`tipsen serve`: run the BentoML service (`service.service:Tipsen`) from the project root.

The service reads its params file, profile and bank from TIPSEN_PARAMS, TIPSEN_PROFILE and TIPSEN_BANK; this
command checks them first (a mistake is one line, not a server that never gets ready), sets them, and then
replaces itself with `bentoml serve`, so signals reach the server directly. The bank is read when the server
starts; after `tipsen bank build` (or `dvc repro`), `POST /bank/reload` swaps the new adapters in.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from tipsen import paths
from tipsen.bank import Bank
from tipsen.config import load_params
from tipsen.errors import ConfigError, require

ROOT = paths.ROOT
SERVICE = "service.service:Tipsen"
BIND_HOST_ENV = "TIPSEN_BIND_HOST"  # the service answers to the Host name it was bound to (service/middleware.py)


def add_arguments(parser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all; default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="port (default: 3000)")
    parser.add_argument("--bank", default=str(paths.BANK), help=f"bank index (default: {paths.BANK}, from the project root)")


def command(*, params: Path, profile: str | None, bank: Path, host: str, port: int) -> tuple[list[str], dict]:
    """The `bentoml serve` command line and its environment."""
    env = {**os.environ, "TIPSEN_PARAMS": str(params.resolve()), "TIPSEN_BANK": str(bank.resolve()),
           BIND_HOST_ENV: host}  # the Host check answers to the name bound to
    if profile:
        env["TIPSEN_PROFILE"] = profile
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage reports from an offline service
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    return cmd, env


def check_bind(host: str, port: int) -> None:
    """A ConfigError now if `host:port` cannot be bound (in use, or not this machine's address), rather than
    bentoml's traceback after the models load. A port only in TIME_WAIT counts as free, as it does for servers."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ConfigError(f"--host: {host!r} is not a name or address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port: port {port} is in use on {host}; stop what listens there, or choose "
                                  "another with --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host: {host} is not an address of this machine") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"--port: port {port} needs privileges; allowed without them: 1024 to 65535") \
                    from None
            raise


def run(args) -> int:
    params = load_params(args.params, profile=args.profile)
    params.log()
    require("bentoml", "serve", what="serve")
    if not (ROOT / "service" / "service.py").is_file():
        raise ConfigError(f"serve: {ROOT / 'service'} not found; run 'tipsen serve' from a source checkout")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: {args.port} is out of range; allowed: 1 to 65535")
    check_bind(args.host, args.port)
    bank = paths.in_project(args.bank)
    Bank(bank)  # a missing or unreadable index is a user error, reported now
    cmd, env = command(params=Path(args.params), profile=args.profile, bank=bank, host=args.host, port=args.port)
    print(f"tipsen serve: http://{args.host}:{args.port}/ (profile {params.profile}, bank {bank})", file=sys.stderr,
          flush=True)
    os.chdir(ROOT)
    os.execve(cmd[0], cmd, env)  # replaces this process: bentoml gets the signals and the exit status
