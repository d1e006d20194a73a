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
        except config.ConfigException as exc:
            raise NoClusterConfig(
                f"cannot use the in-cluster configuration (KUBERNETES_SERVICE_HOST is set): {exc}"
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
    except config.ConfigException as exc:
        raise NoClusterConfig(f"cannot use kubeconfig {path}: {exc}") from exc
