"""Keys for a bridge reached over the network: ``python -m ns3_bridge.keys DIR``.

A bridge that listens on a non-loopback address (``--allow-remote``) must use ZeroMQ CURVE: traffic is
encrypted and only clients whose public key the bridge holds get answers. This command makes, in
``DIR``:

- ``server.key_secret`` (the bridge's key pair: stays on the bridge's machine) and ``server.key``
  (its public key: give it to every training machine);
- ``client.key_secret`` (a client key pair: for the training machine) and ``client.key``;
- ``clients/client.key``: the public keys the bridge accepts (add more client ``.key`` files there).

Then ``python -m ns3_bridge.server --endpoint tcp://0.0.0.0:5555 --allow-remote --curve-keys DIR`` on
the bridge's machine, and ``Ns3Network(endpoint="tcp://HOST:5555", curve_keys=DIR)`` (Hydra
``network.curve_keys=DIR``) where training runs, with ``server.key`` and ``client.key_secret`` in
``DIR``. Loopback and ipc endpoints need no keys.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import zmq
import zmq.auth

SERVER_SECRET = "server.key_secret"
SERVER_PUBLIC = "server.key"
CLIENT_SECRET = "client.key_secret"
CLIENTS = "clients"


def make_keys(directory: str | Path) -> Path:
    """Create the bridge's and one client's key pairs in ``directory`` (see the module docstring)."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE; install pyzmq's wheel")
    root = Path(directory)
    (root / CLIENTS).mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (root / f"{name}.key_secret").exists():
            raise FileExistsError(f"{root / (name + '.key_secret')} exists; use another folder or remove it")
        zmq.auth.create_certificates(str(root), name)
    shutil.copy(root / "client.key", root / CLIENTS / "client.key")
    return root


def server_keys(directory: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` of the bridge."""
    return _load(Path(directory) / SERVER_SECRET, secret=True)


def client_keys(directory: str | Path) -> tuple[bytes, bytes, bytes]:
    """``(client public, client secret, server public)`` for a client."""
    public, secret = _load(Path(directory) / CLIENT_SECRET, secret=True)
    server_public, _ = _load(Path(directory) / SERVER_PUBLIC, secret=False)
    return public, secret, server_public


def _load(path: Path, secret: bool) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise FileNotFoundError(f"no CURVE key file {path} (make keys with: python -m ns3_bridge.keys {path.parent})")
    public, private = zmq.auth.load_certificate(str(path))
    if secret and private is None:
        raise ValueError(f"{path} holds no secret key")
    return public, private


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ns3_bridge.keys", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="folder to create the key files in")
    args = p.parse_args(argv)
    try:
        root = make_keys(args.directory)
    except (OSError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"keys made in {root}: bridge machine: {SERVER_SECRET} and {CLIENTS}/; training machine: {SERVER_PUBLIC} and {CLIENT_SECRET}")


if __name__ == "__main__":
    main()
