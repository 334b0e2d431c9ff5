"""`promptfolio serve`, `promptfolio tenant add|list|rotate-key` (the REST client's commands: client_commands)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.config import ServiceConfig, env_name

# flags of `promptfolio serve` that set a ServiceConfig field; a flag not given leaves the service's
# own setting (PROMPTFOLIO_* environment, else ServiceConfig's default): one source of defaults
SERVE_SETTINGS = ("store", "arch", "pretrained", "admin_key")


def _store_path(args: argparse.Namespace) -> Path:
    return Path(args.store if args.store is not None else ServiceConfig.setting("store"))


def serve_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The service's environment: `environ` with the given flags as PROMPTFOLIO_* settings."""
    env = dict(environ)
    env.update({env_name(name): str(getattr(args, name)) for name in SERVE_SETTINGS
                if getattr(args, name) is not None})
    env[env_name("store")] = str(Path(ServiceConfig.setting("store", env)).resolve())
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env.setdefault("BENTOML_HOME", str(Path(".cache/bentoml").resolve()))
    return env


def _serve(args: argparse.Namespace) -> int:
    from prompts_store.layout import open_root

    env = serve_env(args, dict(os.environ))
    store = env[env_name("store")]
    open_root(store, create=args.init)  # a missing store is an error (exit 2) unless --init
    _check_settings(env)
    _check_port_free(args.host, args.port)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:PromptFolio", "--working-dir", str(root),
           "--host", args.host, "--port", str(args.port)]
    print(f"serving on http://{args.host}:{args.port}/v1 (store {store})", file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _check_settings(env: dict[str, str]) -> None:
    """The service's PROMPTFOLIO_* settings, checked here: in the worker a bad one is a traceback."""
    from pydantic import ValidationError

    from service.config import ENV_PREFIX, ServiceConfig

    # `pretrained` is checked when the encoder loads (its parser imports torch, which this process avoids)
    try:
        ServiceConfig.from_env({k: v for k, v in env.items() if k != ENV_PREFIX + "PRETRAINED"})
    except ValidationError as e:
        err = e.errors()[0]
        name = ENV_PREFIX + str(err["loc"][0]).upper() if err["loc"] else "settings"
        raise ValueError(f"invalid setting {name}={err.get('input')!r}: {err['msg']}") from None


def _check_port_free(host: str, port: int) -> None:
    """A port in use is one line here; BentoML would print a 55-line traceback."""
    import errno
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: a port is 1-65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind((host, port))
    except OSError as e:
        hint = " (another server? choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


def _store(args: argparse.Namespace, create: bool = False):
    from prompts_store.store import PromptStore

    return PromptStore(_store_path(args), create=create)


def _classes(args: argparse.Namespace) -> list[str]:
    if args.classes_file:
        return [line.strip() for line in Path(args.classes_file).read_text().splitlines() if line.strip()]
    return [c.strip() for c in args.classes.split(",") if c.strip()]


def _tenant_add(args: argparse.Namespace) -> int:
    if not args.classes and not args.classes_file:
        raise ValueError("give the tenant's classes with --classes 'a,b,c' or --classes-file")
    key = _store(args, create=True).add_tenant(args.tenant, _classes(args), args.theta)
    print(f"tenant {args.tenant} registered; its API key (shown once, stored hashed):", file=sys.stderr)
    print(key)
    return 0


def _tenant_list(args: argparse.Namespace) -> int:
    store = _store(args)
    for tenant in store.iter_tenants():  # a page at a time: memory stays flat at a million tenants
        s = store.serving(tenant)
        theta = "auto" if s.theta_setting is None else f"{s.theta_setting:g}"
        if s.theta_setting is None and s.local_theta is not None:
            theta += f"({s.local_theta:g})"
        pair = "pinned" if s.pinned else "follows-current"
        if s.trained_together is False:
            pair += ",not-trained-together"
        print(f"{tenant}\tclasses={len(s.classes)}\ttheta={theta}\tglobal_version={s.global_version}"
              f"\tlocal_version={s.local_version}\t{pair}")
    return 0


def _tenant_rotate(args: argparse.Namespace) -> int:
    print(_store(args).rotate_key(args.tenant))
    return 0


def _setting_help(name: str, what: str) -> str:
    return f"{what} (default: ${env_name(name)}, else {ServiceConfig.model_fields[name].default})"


def add_commands(sub) -> None:
    from promptfolio.commands import add_encoder_args

    p = sub.add_parser("serve", help="run the REST service (BentoML) on the embedded default")
    add_encoder_args(p)
    # not given: the service's own setting (environment, else ServiceConfig's default)
    p.set_defaults(arch=None, pretrained=None)
    p.add_argument("--store", default=None, help=_setting_help("store", "prompts store folder"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--admin-key", default=None,
                   help="enables the admin endpoints (or PROMPTFOLIO_ADMIN_KEY; a flag shows in `ps`)")
    p.add_argument("--init", action="store_true", help="create the store if the folder holds none")
    p.set_defaults(handler=_serve)

    t = sub.add_parser("tenant", help="manage tenants in a store (local admin)")
    tsub = t.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    p = tsub.add_parser("add", help="register a tenant and print its API key")
    p.add_argument("tenant")
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--classes-file", help="one class name per line")
    p.add_argument("--theta", type=float, help="fixed θ (default: the uploaded artifact's θ, else 0.4)")
    p.add_argument("--store", default=None, help=_setting_help("store", "prompts store folder"))
    p.set_defaults(handler=_tenant_add)
    p = tsub.add_parser("list", help="list tenants")
    p.add_argument("--store", default=None, help=_setting_help("store", "prompts store folder"))
    p.set_defaults(handler=_tenant_list)
    p = tsub.add_parser("rotate-key", help="issue a new API key (the old one stops working)")
    p.add_argument("tenant")
    p.add_argument("--store", default=None, help=_setting_help("store", "prompts store folder"))
    p.set_defaults(handler=_tenant_rotate)
