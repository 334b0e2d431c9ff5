"""`promptfolio classify` and `promptfolio upload`: the REST client (promptfolio.client) from a shell.

Keys come from PROMPTFOLIO_KEY (a tenant's) and PROMPTFOLIO_ADMIN_KEY, or from --key: a key on the
command line shows in `ps` and in the shell's history, so the environment is the better place.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_BATCH = 32  # images per request: below the service's default limit of 64


def _client(args: argparse.Namespace, admin: bool = False):
    from promptfolio.client import Client

    key = args.key or None
    return Client(args.url, key=None if admin else key, admin_key=key if admin else None,
                  tenant=getattr(args, "tenant", None), timeout=args.timeout)


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to their image files (recursively, sorted)."""
    from promptfolio.images import is_image_file

    paths: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise ValueError(f"no image files (.jpg, .png, .webp, .bmp, .gif) in folder {path}")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return paths


def _classify(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    paths = image_paths(args.inputs)
    results = []
    with _client(args) as client:
        for start in range(0, len(paths), args.batch):
            chunk = paths[start : start + args.batch]
            answer = client.classify(chunk, top_k=args.top_k, theta=args.theta)
            for path, prediction in zip(chunk, answer.predictions):
                top = [(t.label, t.score) for t in prediction.top]
                results.append({"file": str(path), "top": [{"label": label, "score": score} for label, score in top]})
                if not args.json:
                    print(f"{path}\t" + "\t".join(f"{label} {score:.3f}" for label, score in top), flush=True)
    if args.json:
        serving = answer.model_dump(exclude={"predictions", "notes"})
        print(json.dumps({**serving, "predictions": results}, indent=1, ensure_ascii=False))
    return 0


def _upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"no such artifact file: {path}")
    if args.tenant is None:  # a global prompt: the admin's
        with _client(args, admin=True) as client:
            result = client.publish_global(path)
    else:
        with _client(args) as client:
            result = client.upload_local(path, allow_unpinned=args.allow_unpinned)
    print(result.model_dump_json(indent=1))
    return 0


def _add_connection_args(p: argparse.ArgumentParser, key_help: str) -> None:
    p.add_argument("--url", default=os.environ.get("PROMPTFOLIO_URL", "http://127.0.0.1:3000"),
                   help="the service (a trailing /v1 is fine; default: $PROMPTFOLIO_URL, else %(default)s)")
    p.add_argument("--key", help=key_help)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")


def add_commands(sub) -> None:
    p = sub.add_parser("classify", help="classify image files or folders with a running service",
                       description="Classify images for a tenant of a running service and print each "
                                   "image's top labels with their scores.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched recursively for .jpg/.png/.webp/.bmp/.gif")
    _add_connection_args(p, "the tenant's API key (default: $PROMPTFOLIO_KEY, which keeps it out of `ps`)")
    p.add_argument("--tenant", help="tenant id (default: the one the tenant key names; needed with the admin key)")
    p.add_argument("--top-k", type=int, default=5, help="labels per image")
    p.add_argument("--theta", type=float, help="θ for this request (default: the tenant's)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per request")
    p.add_argument("--json", action="store_true", help="print the answer as JSON instead of one line per image")
    p.set_defaults(handler=_classify)

    p = sub.add_parser("upload", help="upload a prompt artifact to a running service over REST")
    _add_connection_args(p, "the tenant's API key, or the admin key for a global prompt (default: "
                            "$PROMPTFOLIO_KEY with --tenant, else $PROMPTFOLIO_ADMIN_KEY)")
    p.add_argument("--tenant", help="the tenant whose local prompt this is; omit to publish a global prompt "
                                    "(admin key)")
    p.add_argument("--allow-unpinned", action="store_true",
                   help="accept a local prompt whose global prompt the store does not hold (served unpinned)")
    p.add_argument("--file", required=True, help="a .safetensors prompt artifact")
    p.set_defaults(handler=_upload)

