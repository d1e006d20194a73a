"""Settings: every one is a command-line flag with an environment-variable twin and a default.

This module is the only reader of `os.environ` for settings. Values are validated when the
command starts; a bad one stops it with a message that names the flag and the variable.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "LOCUST_WEBHOOK_"
# Matched with fullmatch: `$` would let a trailing newline through, which the API server refuses.
QUANTITY = re.compile(r"([0-9]+(\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
IMAGE = re.compile(r"[a-z0-9][a-z0-9._\-/:@]*", re.IGNORECASE)


class SettingError(ValueError):
    """A setting has a value the webhook cannot start with."""


def _positive_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingError(f"must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 3600:
        raise SettingError(f"must be more than 0 and at most 3600 seconds, got {raw!r}")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise SettingError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"must be true or false, got {raw!r}")


def _quantity(raw: str) -> str:
    if raw and not QUANTITY.fullmatch(raw):
        raise SettingError(f"must be a Kubernetes quantity such as 100m or 64Mi, got {raw!r}")
    return raw


def _image(raw: str) -> str:
    if not IMAGE.fullmatch(raw):
        raise SettingError(f"must be a container image reference, got {raw!r}")
    return raw


# A namespace or Service name. Matched with fullmatch: `$` would let a trailing newline through
# (into a Secret and its SANs).
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _namespaces(raw: str) -> tuple[str, ...]:
    names = tuple(sorted({n.strip() for n in raw.split(",") if n.strip()}))
    for name in names:
        if not DNS_LABEL.fullmatch(name):
            raise SettingError(f"{name!r} is not a namespace name")
    return names


def text(raw: str) -> str:
    """A setting taken as it is."""
    return raw


def _optional_dir(raw: str) -> str:
    if raw and not os.path.isdir(raw):
        raise SettingError(f"{raw!r} is not a directory")
    return raw


@dataclass(frozen=True)
class Option:
    flag: str
    default: str
    parse: Callable[[str], Any]
    help: str

    @property
    def attr(self) -> str:
        return attr_name(self.flag)

    @property
    def env(self) -> str:
        return env_var(self.flag)


def attr_name(flag: str) -> str:
    """A flag's settings attribute: --lookup-timeout, lookup_timeout."""
    return flag.lstrip("-").replace("-", "_")


def env_var(flag: str) -> str:
    """A flag's environment variable twin: --lookup-timeout, LOCUST_WEBHOOK_LOOKUP_TIMEOUT."""
    return ENV_PREFIX + attr_name(flag).upper()


def named(flag: str) -> str:
    """A flag with its environment variable, as every message about a setting names it."""
    return f"{flag} ({env_var(flag)})"


MUTATION_OPTIONS = (
    Option(
        "--sidecar-mode",
        "native",
        _choice("native", "container"),
        "how the exporter sidecar is added: native (init container with restartPolicy "
        "Always, Kubernetes >= 1.29) or container (plain container, older clusters)",
    ),
    Option(
        "--exporter-image",
        "containersol/locust_exporter:v0.5.0",
        _image,
        "image of the Prometheus metrics exporter sidecar",
    ),
    Option(
        "--exporter-port",
        "9646",
        _positive_int(1, 65535),
        "port the exporter sidecar listens on (and the prometheus.io/port annotation)",
    ),
    Option(
        "--exporter-pull-policy",
        "IfNotPresent",
        _choice("Always", "IfNotPresent", "Never"),
        "imagePullPolicy of the exporter sidecar",
    ),
    Option("--exporter-cpu-request", "10m", _quantity, "CPU request of the exporter sidecar"),
    Option(
        "--exporter-memory-request", "32Mi", _quantity, "memory request of the exporter sidecar"
    ),
    Option(
        "--exporter-cpu-limit", "", _quantity, "CPU limit of the exporter sidecar (empty: none)"
    ),
    Option(
        "--exporter-memory-limit",
        "64Mi",
        _quantity,
        "memory limit of the exporter sidecar (empty: none)",
    ),
    Option(
        "--resource-attributes",
        "true",
        _boolean,
        "merge k8s.namespace.name, k8s.pod.name, locust.test.name and locust.role "
        "into OTEL_RESOURCE_ATTRIBUTES",
    ),
)

SERVE_OPTIONS = (
    Option("--cert-file", "certs/tls.crt", text, "TLS certificate (PEM), reloaded on change"),
    Option("--key-file", "certs/tls.key", text, "TLS private key (PEM), reloaded on change"),
    Option("--host", "0.0.0.0", text, "address to bind"),
    Option("--port", "8443", _positive_int(1, 65535), "HTTPS port"),
    Option("--workers", "2", _positive_int(1, 64), "gunicorn worker processes"),
    Option(
        "--threads",
        "16",
        _positive_int(1, 256),
        "threads per worker (gthread); idle keep-alive connections use none",
    ),
    Option(
        "--keepalive",
        "120",
        _positive_int(1, 3600),
        "seconds an idle keep-alive connection stays open (the API server keeps ~90 s)",
    ),
    Option(
        "--graceful-timeout",
        "20",
        _positive_int(1, 600),
        "seconds in-flight admissions get to finish after SIGTERM",
    ),
    Option(
        "--max-body-bytes",
        str(4 * 1024 * 1024),
        _positive_int(1024, 64 * 1024 * 1024),
        "largest AdmissionReview accepted; larger bodies get 413",
    ),
    Option(
        "--locusttests",
        "",
        _optional_dir,
        "directory of LocustTest YAML files to use instead of the cluster "
        "(empty: the cluster, in-cluster config else KUBECONFIG / ~/.kube/config)",
    ),
    Option(
        "--namespaces",
        "",
        _namespaces,
        "comma-separated namespaces whose LocustTests are watched (empty: all); a pod in "
        "another namespace gets the failure policy (reason namespace-not-watched)",
    ),
    Option(
        "--lookup-timeout",
        "1.5",
        _seconds,
        "seconds the direct GET (with retries) may take when a LocustTest is not in the cache; "
        "keep it 2 s under the webhook configuration's timeoutSeconds (5), or the API server's "
        "failure policy answers before the webhook does",
    ),
    Option(
        "--failure-policy",
        "open",
        _choice("open", "closed"),
        "open: admit pods unchanged (with a warning) when the LocustTest cannot be read; "
        "closed: deny them",
    ),
    Option(
        "--log-level",
        "info",
        _choice("debug", "info", "warning", "error"),
        "log level: debug, info, warning or error",
    ),
)


@dataclass(frozen=True)
class MutationSettings:
    """What shapes the patch; shared by `serve` and `inject`."""

    sidecar_mode: str = "native"
    exporter_image: str = "containersol/locust_exporter:v0.5.0"
    exporter_port: int = 9646
    exporter_pull_policy: str = "IfNotPresent"
    exporter_cpu_request: str = "10m"
    exporter_memory_request: str = "32Mi"
    exporter_cpu_limit: str = ""
    exporter_memory_limit: str = "64Mi"
    resource_attributes: bool = True


@dataclass(frozen=True)
class ServeSettings:
    """Everything `locust-webhook serve` needs."""

    mutation: MutationSettings = field(default_factory=MutationSettings)
    cert_file: str = "certs/tls.crt"
    key_file: str = "certs/tls.key"
    host: str = "0.0.0.0"
    port: int = 8443
    workers: int = 2
    threads: int = 16
    keepalive: int = 120
    graceful_timeout: int = 20
    max_body_bytes: int = 4 * 1024 * 1024
    locusttests: str = ""
    namespaces: tuple[str, ...] = ()
    lookup_timeout: float = 1.5
    failure_policy: str = "open"
    log_level: str = "info"


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add each option as a flag whose help shows the default and the environment variable."""
    for option in options:
        shown = option.default if option.default != "" else "(empty)"
        parser.add_argument(
            option.flag,
            dest=option.attr,
            default=None,
            metavar=option.attr.upper(),
            help=f"{option.help} [env {option.env}, default: {shown}]",
        )


def resolve(
    options: Sequence[Option], args: argparse.Namespace, environ: Mapping[str, str]
) -> dict[str, Any]:
    """Each option's value, parsed: from its flag, else its variable, else its default. A bad
    one raises SettingError naming the flag, the variable and where the value came from."""
    values: dict[str, Any] = {}
    for option in options:
        raw = getattr(args, option.attr, None)
        source = option.flag
        if raw is None:
            raw = environ.get(option.env)
            source = option.env
        if raw is None:
            raw = option.default
            source = f"{option.flag} default"
        try:
            values[option.attr] = option.parse(raw)
        except SettingError as exc:
            raise SettingError(f"{named(option.flag)} from {source}: {exc}") from None
    return values


def mutation_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> MutationSettings:
    """Mutation settings from flags, else environment, else defaults."""
    env = os.environ if environ is None else environ
    return MutationSettings(**resolve(MUTATION_OPTIONS, args, env))


def serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Serve settings from flags, else environment, else defaults; validated."""
    env = os.environ if environ is None else environ
    values = resolve(SERVE_OPTIONS, args, env)
    settings = ServeSettings(mutation=mutation_settings(args, env), **values)
    for option in (o for o in SERVE_OPTIONS if o.flag in ("--cert-file", "--key-file")):
        path = getattr(settings, option.attr)
        if os.path.exists(path) and not os.path.isfile(path):
            raise SettingError(f"{named(option.flag)}: {path!r} is not a file")
        if not os.path.isfile(path):
            hint = (
                " (`make certs` writes development certificates for localhost there)"
                if path == option.default
                else ""
            )
            raise SettingError(f"{named(option.flag)}: {path!r} does not exist{hint}")
    return settings
