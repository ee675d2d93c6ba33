"""Scenario 7 of `make e2e`: the chart's TLS values. Every Dask connection is mutual TLS; a client
without a certificate is refused; requests through the ingress still succeed."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from certificates import write_tls_secret
from distributed import Client
from distributed.security import Security

from e2e.conftest import E2E_TLS_VALUES, render, started_cluster
from e2e.load import LoadDriver, record
from e2e.runner import Cluster, HelperImages

# The first test also waits for the image builds (scripts/build-image.sh, nginx) and the cluster.
pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tls_cluster(image: str, helper_images: HelperImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    documents = render(E2E_TLS_VALUES, image)
    daskcluster = next(d for d in documents if d["kind"] == "DaskCluster")
    secret = daskcluster["spec"]["scheduler"]["spec"]["volumes"][-1]["secret"]["secretName"]
    run_as_group = daskcluster["spec"]["scheduler"]["spec"]["securityContext"]["fsGroup"]
    workdir = tmp_path_factory.mktemp("e2e-tls")
    service = f"{daskcluster['metadata']['name']}-scheduler"
    certificates = write_tls_secret(workdir / "secret", [service, f"{service}.e2e.svc.cluster.local"], run_as_group)
    yield from started_cluster(documents, workdir, helper_images, secrets={secret: certificates})


def handshake_without_client_certificate(host: str, port: int, ca_file: str) -> str:
    """What a TLS client that trusts the CA but has no certificate of its own gets: the error text,
    or "" if the scheduler let it talk."""
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False  # distributed does not check host names either; only the client cert matters
    try:
        with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            tls.sendall(b"\0" * 8)
            return "" if tls.recv(1) else "closed by the scheduler"  # TLS 1.3 reports the refusal on read
    except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


# The control client runs on the host's Python (patch version differs from the image's): expected.
@pytest.mark.filterwarnings("ignore:Mismatched versions found")
def test_7_dask_over_mutual_tls(tls_cluster: Cluster) -> None:
    cluster = tls_cluster
    workers = cluster.scheduler_workers()
    assert workers and all(w["address"].startswith("tls://") for w in workers), workers
    for pod in cluster.api_pods():
        ready = cluster.http.get(f"http://{cluster.ip(pod)}:8000/readyz").json()
        assert ready["status"] == "ready" and ready["scheduler"].startswith("tls://"), ready

    host, port = cluster.ip(cluster.scheduler), cluster.scheduler.spec.port("tcp-comm")
    secret = next(iter(cluster.secrets.values()))
    refusal = handshake_without_client_certificate(host, port, str(secret / "ca.crt"))
    assert refusal, "the scheduler accepted a TLS client without a certificate"
    with pytest.raises(OSError):  # a plain-TCP Dask client cannot even start talking
        Client(f"tcp://{host}:{port}", timeout=5, set_as_default=False)
    # Control: the same scheduler accepts a client that presents the Secret's certificate.
    security = Security(tls_ca_file=str(secret / "ca.crt"), tls_client_cert=str(secret / "tls.crt"),
                        tls_client_key=str(secret / "tls.key"), require_encryption=True)
    with Client(f"tls://{host}:{port}", security=security, timeout=10, set_as_default=False) as client:
        assert client.scheduler_info()["workers"]

    # /fib 20..25 is cheap: the API pods send it straight to the workers (service.direct) through
    # their Client's connection pool, so with the Client's certificate. A worker that refused the
    # API's TLS connection would count as a refused direct call, and its work would quietly become
    # a Dask task through the scheduler.
    direct_before = cluster.direct_calls()
    started = time.monotonic()
    with LoadDriver(cluster.ingress_url, cluster.ingress_host, fast_users=2, fib_users=4, fib_n=(20, 25)) as load:
        time.sleep(10)
    results = load.results
    direct = cluster.direct_calls(since=direct_before)
    print(f"no-certificate client refused with: {refusal}; {len(results.samples)} requests in "
          f"{time.monotonic() - started:.0f} s; direct calls by outcome: {direct}")
    record("7 dask over mutual TLS", results,
           f"no-cert client refused; direct calls {direct['answered']} answered, {direct['refused']} refused")
    assert results.sent == results.answered == len(results.samples)
    assert results.samples and not results.failures, [f.error for f in results.failures[:5]]
    assert sum(s.correct for s in results.select("/fib")) > 0
    # The workers accepted the API's TLS connections: cheap /fib was answered by direct calls.
    assert direct["answered"] > 0 and direct["refused"] == 0, direct
