"""`locust-webhook`: serve, inject, certs."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson
import yaml

from .config import (
    MUTATION_OPTIONS,
    SERVE_OPTIONS,
    SettingError,
    add_options,
    mutation_settings,
    named,
    serve_settings,
)


class UsageError(Exception):
    """Bad input to a command: printed without a traceback, exit code 2."""


@contextlib.contextmanager
def metrics_dir() -> Iterator[None]:
    """Give the workers a shared Prometheus multiprocess directory, before prometheus_client is
    imported (it picks its storage at import)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    path = tempfile.mkdtemp(prefix="locust-webhook-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    owner = os.getpid()
    try:
        yield
    finally:
        # Forked workers leave through this frame too: only the process that made it removes it.
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)


def run_serve(args: argparse.Namespace) -> int:
    """Start the HTTPS server."""
    settings = serve_settings(args)
    with metrics_dir():
        from .lookup import SourceUnavailable
        from .server import serve
        from .tls import CertificateError

        try:
            serve(settings)
        except CertificateError as exc:
            raise UsageError(f"{named('--cert-file')}/{named('--key-file')}: {exc}") from None
        except SourceUnavailable as exc:
            where = f"cannot watch LocustTests in the cluster ({named('--locusttests')} is empty)"
            raise UsageError(f"{where}: {exc}") from None
    return 0


def _load_documents(path: str) -> list[Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not YAML or JSON: {exc}") from None


def _pick_locusttest(path: str, wanted: str | None) -> Any:
    from .models import InvalidLocustTest, parse_locusttest

    tests = [
        d for d in _load_documents(path) if isinstance(d, dict) and d.get("kind") == "LocustTest"
    ]
    if not tests:
        raise UsageError(f"{path} holds no LocustTest")
    matching = [t for t in tests if _mapping(t.get("metadata")).get("name") == wanted] or tests[:1]
    # v2 wins over v1 for the same name, as it does for the server.
    chosen = max(matching, key=lambda t: str(t.get("apiVersion")).endswith("/v2"))
    try:
        test = parse_locusttest(chosen)
    except InvalidLocustTest as exc:
        raise UsageError(f"{path}: {exc}") from None
    if test.problem:
        raise UsageError(f"{path}: {test.problem}")
    return test


def _mapping(value: Any) -> dict[str, Any]:
    """A field that should hold an object: {} when it holds anything else."""
    return value if isinstance(value, dict) else {}


def run_inject(args: argparse.Namespace) -> int:
    """Mutate a Pod or a Job's pod template offline, with the same code the server runs."""
    from .mutation import MalformedPod, NoTarget, mutate
    from .mutation.pod import TEST_NAME_LABEL
    from .patch import diff

    settings = mutation_settings(args)
    documents = _load_documents(args.file)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise UsageError(f"{args.file} must hold exactly one Pod or Job")
    obj = documents[0]
    kind = obj.get("kind")
    pod: Any = obj
    prefix = ""
    if kind == "Job":
        pod, prefix = _mapping(obj.get("spec")).get("template"), "/spec/template"
        if not isinstance(pod, dict):
            raise UsageError("the Job has no spec.template")
    elif kind != "Pod":
        got = "an object without a kind" if kind is None else f"kind {kind!r}"
        raise UsageError(f"{args.file}: expected a Pod or a Job, got {got}")
    label = _mapping(_mapping(pod.get("metadata")).get("labels")).get(TEST_NAME_LABEL)
    test = _pick_locusttest(args.locusttest, label)
    err: TextIO = sys.stderr
    if label != test.name:
        found = (
            f" has no {TEST_NAME_LABEL} label"
            if label is None
            else f"'s {TEST_NAME_LABEL} label is {label!r}, not {test.name!r}"
        )
        print(f"warning: the pod{found}; the server would not use LocustTest {test.name}", file=err)
    namespace = args.namespace or _mapping(obj.get("metadata")).get("namespace") or test.namespace
    try:
        result = mutate(pod, test, namespace, settings)
    except (MalformedPod, NoTarget) as exc:
        raise UsageError(f"cannot inject: {exc}") from None
    for warning in result.warnings:
        print(f"warning: {warning}", file=err)
    if args.output == "patch":
        ops = [{**op, "path": prefix + op["path"]} for op in diff(pod, result.pod)]
        sys.stdout.write(orjson.dumps(ops, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    mutated = (
        result.pod if kind == "Pod" else {**obj, "spec": {**obj["spec"], "template": result.pod}}
    )
    if args.output == "json":
        sys.stdout.write(orjson.dumps(mutated, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(mutated, sort_keys=False))
    return 0


def build_parser(with_certs: bool = True) -> argparse.ArgumentParser:
    """The command line: every setting with its environment variable and default in --help."""
    parser = argparse.ArgumentParser(
        prog="locust-webhook",
        description="Admission webhook that gives Locust load tests their observability.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the webhook over HTTPS (gunicorn)")
    add_options(serve, SERVE_OPTIONS)
    add_options(serve, MUTATION_OPTIONS)
    serve.set_defaults(func=run_serve)

    inject = commands.add_parser(
        "inject", help="mutate a Pod or Job file offline and print the result"
    )
    inject.add_argument("-f", "--file", required=True, help="Pod or Job (YAML/JSON), - for stdin")
    inject.add_argument("--locusttest", required=True, help="file with the LocustTest (YAML)")
    inject.add_argument(
        "-o",
        "--output",
        choices=("yaml", "json", "patch"),
        default="yaml",
        help="print the mutated object, or the RFC 6902 patch",
    )
    inject.add_argument(
        "-n",
        "--namespace",
        default="",
        help="namespace of the pod (default: the object's, else the LocustTest's)",
    )
    add_options(inject, MUTATION_OPTIONS)
    inject.set_defaults(func=run_inject)

    if with_certs:
        from .certs import add_parser as add_certs_parser

        add_certs_parser(commands)
    for command in commands.choices.values():
        command.set_defaults(parser=command)  # to refuse unknown flags with its own usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # `serve` never needs `certs`, whose cryptography import would cost every worker ~8 MB.
    args, unknown = build_parser(with_certs=argv[:1] != ["serve"]).parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code: int = args.func(args)
    except (SettingError, UsageError) as exc:
        print(f"locust-webhook {args.command}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
