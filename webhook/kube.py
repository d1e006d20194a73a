"""The Kubernetes API client of `serve`'s watcher and of `certs`: one way to find the cluster."""

from __future__ import annotations

import os

from kubernetes import client, config


class NoClusterConfig(Exception):
    """No usable way to reach the Kubernetes API; the message says what was tried."""


def api_client(kubeconfig: str = "") -> client.ApiClient:
    """A client from `kubeconfig` when given; else, in a pod (KUBERNETES_SERVICE_HOST set), from
    its service account; else from KUBECONFIG or ~/.kube/config."""
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise NoClusterConfig(
                "cannot use the in-cluster configuration (KUBERNETES_SERVICE_HOST is set): "
                + _reason(exc)
            ) from exc
        return client.ApiClient(configuration)
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not any(os.path.exists(p) for p in path.split(os.pathsep) if p):
        if kubeconfig:
            raise NoClusterConfig(f"no kubeconfig at {path}")
        raise NoClusterConfig(
            "no Kubernetes API configuration: not running in a cluster "
            f"(KUBERNETES_SERVICE_HOST unset) and no kubeconfig at {path}"
        )
    try:
        return config.new_client_from_config(config_file=path)  # type: ignore[no-untyped-call,no-any-return]
    except Exception as exc:
        raise NoClusterConfig(f"cannot use kubeconfig {path}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    """Why the client refused a configuration: its own message, or for anything else (YAML the
    parser refuses, base64 that does not decode) the error's kind and first line, which quote no
    part of the file (a token, a key)."""
    if isinstance(exc, config.ConfigException):
        return str(exc)
    first = str(exc).strip().splitlines()[:1]
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return name + (f": {first[0][:200]}" if first else "")
