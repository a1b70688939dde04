"""``vblora serve``: an OpenAI-compatible server over a folder of adapters (``pip install vblora[serve]``)."""

from __future__ import annotations

import argparse
import pathlib

from ..formats.readers import FormatError
from ..serving.batcher import Batcher
from ..serving.server import Engine, run_server
from ..serving.store import AdapterStore
from ..training.loop import CAUSAL_LM, RunError, load_base_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a base model and a folder of adapters over OpenAI's HTTP API",
        description="Serve --model with every adapter in --adapters (<name>.vblora files and <name>/ "
        "adapter folders, loaded on first use). A request's `model` names the adapter; the base "
        "model's name (--served-model-name) means no adapter. Needs `pip install vblora[serve]`.",
    )
    p.add_argument(
        "--model", required=True, metavar="PATH|NAME", help="the base model: a folder, or 'smollm2'"
    )
    p.add_argument(
        "--adapters", type=pathlib.Path, action="append", default=[], metavar="DIR",
        help="a folder of adapters (repeatable; the first folder holding a name wins)",
    )  # fmt: skip
    p.add_argument("--served-model-name", help="the base model's name in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default: 64)")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="most tokens a request may generate (default: 256)"
    )
    p.add_argument("--max-resident", type=int, default=64, help="adapters kept loaded (default: 64)")
    p.add_argument(
        "--max-resident-mb", type=float, help="MB of adapter state kept loaded (default: no bound)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=2.0,
        help="how long a new batch waits for more requests (default: 2)",
    )  # fmt: skip
    p.add_argument(
        "--batching", choices=["continuous", "static"], default="continuous",
        help="continuous: new requests join the batch decoding, between two steps; static: they "
        "wait for it to finish (default: continuous)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def engine_from_args(args: argparse.Namespace) -> Engine:
    """The store, batcher and limits that ``args`` describe (the model loaded)."""
    bounds = {"--max-batch-size": args.max_batch_size, "--max-queue": args.max_queue,
              "--max-tokens": args.max_tokens, "--max-resident": args.max_resident}  # fmt: skip
    for flag, value in bounds.items():
        if value < 1:
            raise FormatError(f"{flag} must be at least 1, got {value}")
    if not 0 < args.port < 65536:
        raise FormatError(f"--port must be 1-65535, got {args.port}")
    for folder in args.adapters:
        if not folder.is_dir():
            raise FormatError(f"--adapters {folder}: not a folder")
    model, tokenizer = load_base_model(CAUSAL_LM, args.model)
    max_bytes = None if args.max_resident_mb is None else int(args.max_resident_mb * 2**20)
    store = AdapterStore(model, args.adapters, max_adapters=args.max_resident, max_bytes=max_bytes)
    batcher = Batcher(
        store,
        tokenizer,
        max_batch=args.max_batch_size,
        max_queue=args.max_queue,
        max_wait=args.max_wait_ms / 1000,
        continuous=args.batching == "continuous",
    )
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    name = args.served_model_name or args.model
    return Engine(store, batcher, tokenizer, name, max_tokens=args.max_tokens, max_model_len=int(positions))


def run(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RunError("vblora serve needs FastAPI and uvicorn: pip install 'vblora[serve]'") from None
    engine = engine_from_args(args)
    print(
        f"serving {engine.base_name} and {len(engine.store.names())} adapters on http://{args.host}:{args.port}/v1"
    )
    run_server(engine, args.host, args.port, args.log_level)
