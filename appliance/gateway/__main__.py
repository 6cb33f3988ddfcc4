"""`python -m appliance.gateway`: the gateway process (the supervisor starts it).

--ray-address ADDR       read the replica table from the appliance's Ray cluster
--static-replica M=URL   serve model M from the engine at URL (repeatable; no Ray)
--no-auth                accept requests without an API key (benchmarks, debugging)

Model records (engine, context length, max_num_seqs) come from the state file and
tokenizers from the model store, with either replica source.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from appliance.catalog import load_catalog
from appliance.config import GatewayConfig, load_config
from appliance.errors import ApplianceError
from appliance.gateway import INSTANCE_ENV, WORKER_ENV
from appliance.gateway.app import GatewaySettings, create_app
from appliance.gateway.auth import KeyChecker
from appliance.gateway.deployments import DeploymentBook
from appliance.gateway.limits import SharedLimits
from appliance.gateway.replicas import RayRegistrySource, ReplicaTable, StaticSource
from appliance.gateway.server import bind, bound_address, guarded_protocol
from appliance.ledger import Mover, Spool
from appliance.state import State

log = logging.getLogger("appliance.gateway")


def _pair(text: str) -> tuple[str, str]:
    model, sep, url = text.partition("=")
    if not sep or not model or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected MODEL=http://host:port, got {text!r}")
    return model, url


def _gateway_config(base: GatewayConfig, host: str | None, port: int | None) -> GatewayConfig:
    """The [gateway] section with command-line overrides, validated like the file."""
    data = base.model_dump()
    if host is not None:
        data["host"] = host
    if port is not None:
        data["port"] = port
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ApplianceError(f"invalid gateway settings: {messages}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="appliance-gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--host", default=None, help="override gateway.host")
    parser.add_argument("--port", type=int, default=None, help="override gateway.port")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ray-address")
    source.add_argument("--static-replica", type=_pair, action="append")
    parser.add_argument("--no-auth", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        catalog = load_catalog(config.catalog)
        gc = _gateway_config(config.gateway, args.host, args.port)
        sock = bind(gc.host, gc.port)
    except ApplianceError as exc:
        parser.exit(2, f"error: {exc}\n")
    host, port = bound_address(sock)
    if not gc.is_loopback and not gc.tls_cert:
        log.warning(
            "serving plain HTTP on %s:%d, reachable from other machines "
            "(gateway.allow_insecure_http = true): API keys and prompts cross the network "
            "unencrypted; set gateway.tls_cert and tls_key",
            host,
            port,
        )
    table = ReplicaTable()
    src: StaticSource | RayRegistrySource
    if args.static_replica:
        src = StaticSource(table, args.static_replica)
    else:
        src = RayRegistrySource(
            table, args.ray_address, gc.refresh_interval_s, config.serve.stale_after_s
        )
    state = State(config.state_db)
    keys = KeyChecker(None)
    if gc.require_api_key and not args.no_auth:
        keys = KeyChecker(state.key_records, state.keys_version)

    def modalities(model: str) -> list[str]:
        return list(catalog.get(model).modalities) if model in catalog else []

    book = DeploymentBook(state.deployments, config.store_dir, modalities=modalities)
    settings = GatewaySettings(
        connect_timeout_s=gc.connect_timeout_s,
        request_timeout_s=gc.request_timeout_s,
        retry_after_s=gc.retry_after_s,
        limits=gc.limits,
        instance=os.environ.get(INSTANCE_ENV, ""),
        listen=f"{gc.scheme}://{host}:{port}",
    )
    worker = int(os.environ.get(WORKER_ENV, "0"))
    quota = SharedLimits(config.run_dir / "gateway-limits", worker)
    spool = Spool(config.home_dir / "ledger", f"gateway-{worker}")
    mover = Mover(spool, state)
    mover.start()

    def stop() -> None:
        src.stop()
        mover.stop()

    app = create_app(table, keys, settings, on_shutdown=stop, book=book, quota=quota, spool=spool)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="uvloop",
            http=guarded_protocol(gc.limits, gc.retry_after_s),
            access_log=False,
            server_header=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=int(max(1, gc.limits.keepalive_timeout_s)),
            ssl_certfile=str(gc.tls_cert) if gc.tls_cert else None,
            ssl_keyfile=str(gc.tls_key) if gc.tls_key else None,
        )
    )
    log.info("gateway listening on %s://%s:%d", gc.scheme, host, port)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    main()
