"""The rendered Ingress as an nginx configuration: the ingress controller's part, nothing more.

Routing (hosts, paths, path types, the backend Service and its port) comes from the manifests; the
endpoints are the addresses of the ready API containers, which is what the endpoints controller
would hand ingress-nginx. Proxy settings mirror ingress-nginx's defaults where they change what a
client sees (upstream keep-alive 60 s, HTTP/1.1, retry the next endpoint on connect errors/timeouts,
a 404 default server for unknown hosts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ingress-nginx defaults (https://kubernetes.github.io/ingress-nginx/user-guide/nginx-configuration/configmap/).
UPSTREAM_KEEPALIVE_TIMEOUT = "60s"
PROXY_CONNECT_TIMEOUT = "5s"
PROXY_READ_TIMEOUT = "60s"
PROXY_NEXT_UPSTREAM_TRIES = 3

# A tiny nginx image from the same local Debian base as the project's image (no registry here).
NGINX_CONTAINERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \\
    && rm -rf /var/lib/apt/lists/*
CMD ["nginx", "-c", "/etc/nginx/e2e/nginx.conf", "-g", "daemon off;"]
"""
CONFIG_DIR = "/etc/nginx/e2e"


@dataclass(frozen=True)
class Route:
    host: str | None
    path: str
    path_type: str
    service: str
    service_port: str | int  # the Ingress backend's port name or number

    @property
    def upstream(self) -> str:
        return f"{self.service}-{self.service_port}"


def routes(ingress: dict[str, Any]) -> list[Route]:
    found = []
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            port = backend["port"].get("name", backend["port"].get("number"))
            found.append(Route(rule.get("host"), path["path"], path["pathType"], backend["name"], port))
    return found


def target_port(service: dict[str, Any], port: str | int) -> str | int:
    """The Service port an Ingress backend names -> its targetPort (a container port name or number)."""
    for entry in service["spec"]["ports"]:
        if port in (entry.get("name"), entry.get("port")):
            return entry.get("targetPort", entry["port"])
    raise KeyError(f"Service {service['metadata']['name']} has no port {port!r}")


def _location(route: Route) -> str:
    if route.path_type == "Exact":
        return f"location = {route.path}"
    # Prefix (and ingress-nginx's ImplementationSpecific): element-wise prefix; "/" matches all.
    return f"location {route.path}"


def nginx_config(ingress_routes: list[Route], endpoints: dict[str, list[str]]) -> str:
    """``endpoints``: upstream name -> ["ip:port", ...] of ready pods."""
    upstreams = []
    for name, addresses in endpoints.items():
        if not addresses:
            continue  # no ready pod: ingress-nginx answers 503 itself (see below)
        servers = [f"        server {a} max_fails=0;" for a in addresses]
        upstreams.append("\n".join([
            f"    upstream {name} {{",
            *servers,
            "        keepalive 320;",
            f"        keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT};",
            "        keepalive_requests 10000;",
            "    }",
        ]))
    servers: dict[str | None, list[str]] = {}
    for route in ingress_routes:
        action = f"proxy_pass http://{route.upstream};" if endpoints.get(route.upstream) else "return 503;"
        servers.setdefault(route.host, []).append(f"        {_location(route)} {{ {action} }}")
    server_blocks = []
    for host, locations in servers.items():
        listen = "        listen 80;" if host else "        listen 80 default_server;"
        name = f"        server_name {host};" if host else ""
        server_blocks.append("\n".join(["    server {", listen, name, *locations, "    }"]))
    default = [] if None in servers else ["    server {\n        listen 80 default_server;\n        return 404;\n    }"]
    return "\n".join([
        "worker_processes 1;",
        "pid /tmp/nginx.pid;",
        "error_log stderr warn;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header Host $host;",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        f"    proxy_connect_timeout {PROXY_CONNECT_TIMEOUT};",
        f"    proxy_read_timeout {PROXY_READ_TIMEOUT};",
        f"    proxy_send_timeout {PROXY_READ_TIMEOUT};",
        "    proxy_next_upstream error timeout;",
        f"    proxy_next_upstream_tries {PROXY_NEXT_UPSTREAM_TRIES};",
        *upstreams,
        *default,
        *server_blocks,
        "}",
        "",
    ])
