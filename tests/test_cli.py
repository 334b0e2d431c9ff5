"""The `promptfolio` command: no traps (abbreviations, tracebacks, overwritten weights) and the REST
client's commands against the real server."""

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port
from promptfolio import Client
from promptfolio.cli import build_parser, main, user_error
from promptfolio.embedded import RECORD_PATH, WEIGHTS_PATH, world
from promptfolio.prompts import init_context
from prompts_store.artifact import PromptMeta, artifact_bytes
from service_helpers import ADMIN_KEY, Server, png_bytes


def run_cli(*args, timeout=120, **env):
    """`promptfolio ARGS` in a fresh process (what a user sees: exit code, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "promptfolio.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_no_abbreviations_and_unknown_options_show_the_subcommands_usage(capsys):
    for argv, usage, unknown in ((["train", "--client", "3"], "usage: promptfolio train", "--client 3"),
                                 (["tenant", "add", "acme", "--bogus"], "usage: promptfolio tenant add", "--bogus"),
                                 (["classify", "x.png", "--top", "3"], "usage: promptfolio classify", "--top")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(usage) and f"unrecognized arguments: {unknown}" in err, err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "promptfolio 0.1.0"


def test_every_parser_refuses_abbreviations_and_shows_defaults(monkeypatch):
    monkeypatch.setenv("PROMPTFOLIO_ADMIN_KEY", "admin-secret-in-env")
    parsers = list(all_parsers(build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        assert parser.allow_abbrev is False, parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and "key" not in action.dest and action.help != argparse.SUPPRESS:
                assert "default" in formatter._get_help_string(action), (parser.prog, action.dest)
        assert "admin-secret-in-env" not in parser.format_help()  # a key from the environment stays hidden
    serve_help = next(p for p in parsers if p.prog == "promptfolio serve").format_help()
    assert "(default: 3000)" in serve_help


def test_validation_errors_are_one_line():
    from service.config import ServiceConfig

    with pytest.raises(ValueError) as e:
        ServiceConfig.model_validate({"max_batch": 0, "max_wait_ms": "many"})
    line = user_error(e.value)
    assert "\n" not in line and "errors.pydantic.dev" not in line
    assert "max_batch: Input should be greater than or equal to 1" in line and "max_wait_ms:" in line


def test_pretrain_never_overwrites_the_shipped_weights(capsys):
    digest = hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest()
    with pytest.raises(SystemExit):
        main(["embedded", "pretrain"])
    assert "required: --out" in capsys.readouterr().err
    for target in (WEIGHTS_PATH, WEIGHTS_PATH.with_name("other.safetensors")):
        assert main(["embedded", "pretrain", "--out", str(target), "--steps", "1"]) == 2
        assert "would overwrite the shipped weights" in capsys.readouterr().err
    assert hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest() == digest and RECORD_PATH.is_file()


def test_offline_tag_port_in_use_and_bad_setting_are_one_line(tmp_path):
    # no hub reachable (a closed local port stands for it) and an empty cache: one line, at once
    closed = free_port()
    r = run_cli("info", "--arch", "ViT-B-32", "--pretrained", "openai", HF_HUB_OFFLINE="0",
                HF_ENDPOINT=f"http://127.0.0.1:{closed}", HF_HOME=str(tmp_path / "hf"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "not in the local cache" in r.stderr and "--pretrained PATH" in r.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", "--store", str(tmp_path / "store"), "--init", "--port", str(port), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr

    r = run_cli("serve", "--store", str(tmp_path / "store"), "--port", str(free_port()), timeout=60,
                PROMPTFOLIO_MAX_BATCH="0")
    assert r.returncode == 2 and r.stderr.strip() == ("promptfolio serve: error: invalid setting "
                                                      "PROMPTFOLIO_MAX_BATCH='0': Input should be greater than or equal to 1")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    server = Server(base / "store", base / "server.log").start()
    classes = ["red circle", "blue star", "green square"]
    key = Client(server.url, admin_key=ADMIN_KEY).register("acme", classes).api_key
    yield server, key, classes
    server.stop()


def test_classify_command(served, tmp_path, capsys, monkeypatch):
    server, key, classes = served
    labels = [world.CLASS_NAMES.index(c) for c in classes]
    images, _ = world.task_dataset(3, world.calibrated("clean"), 0, labels=labels)
    (tmp_path / "photos" / "more").mkdir(parents=True)
    for i, image in enumerate(images):
        folder = tmp_path / "photos" / ("more" if i == 2 else "")
        (folder / f"{i}.png").write_bytes(png_bytes(image))
    (tmp_path / "photos" / "notes.txt").write_text("not an image")  # skipped in a folder
    monkeypatch.setenv("PROMPTFOLIO_KEY", key)  # not on the command line

    assert main(["classify", str(tmp_path / "photos"), "--url", server.url + "/v1", "--top-k", "2",
                 "--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / "photos" / n) for n in ("0.png", "1.png")] \
        + [str(tmp_path / "photos" / "more" / "2.png")]
    assert [line.split("\t")[1].rsplit(" ", 1)[0] for line in lines] == classes
    assert all(len(line.split("\t")) == 3 for line in lines)

    assert main(["classify", str(tmp_path / "photos" / "1.png"), "--url", server.url, "--json", "--top-k", "1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["tenant"] == "acme" and answer["predictions"][0]["top"][0]["label"] == classes[1]

    photos, url = str(tmp_path / "photos"), server.url
    for argv, message in (
            ([str(tmp_path / "photos" / "notes.txt"), "--url", url], "server answered 400: notes.txt: not a decodable"),
            ([str(tmp_path / "nothing"), "--url", url], "no such file or folder"),
            ([photos, "--url", f"http://127.0.0.1:{free_port()}"], "cannot connect to"),
            ([photos, "--url", url, "--tenant", "globex"], "server answered 403"),
            ([photos, "--url", url, "--top-k", "0"], "server answered 422")):
        assert main(["classify", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_upload_command(served, tmp_path, capsys, embedded_encoder, monkeypatch):
    server, key, _ = served
    monkeypatch.setenv("PROMPTFOLIO_KEY", key)
    (tmp_path / "photo.safetensors").write_bytes(png_bytes(world.task_dataset(1, world.calibrated("clean"), 0)[0][0]))
    assert main(["upload", "--url", server.url, "--tenant", "acme", "--file", str(tmp_path / "photo.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a safetensors file" in err, err

    ctx = init_context(embedded_encoder, n_ctx=4, generator=torch.Generator().manual_seed(0))
    (tmp_path / "local.safetensors").write_bytes(artifact_bytes(ctx, PromptMeta(
        kind="local", tenant="client-0", encoder=embedded_encoder.fingerprint, n_ctx=4, width=ctx.shape[1])))
    assert main(["upload", "--url", server.url, "--tenant", "acme", "--file", str(tmp_path / "local.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    # a global prompt needs the admin key
    assert main(["upload", "--url", server.url, "--file", str(tmp_path / "local.safetensors")]) == 2
    assert "needs the admin key" in capsys.readouterr().err
