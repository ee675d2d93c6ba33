"""Fixtures for the cluster-in-a-box tests: the image, the nginx image and clusters from `helm template`.

podman is required: without it (or when it cannot run containers) every test here fails with the
command that installs it. Nothing is ever skipped.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _k8s_helpers import CHART, built_image, helm_template, podman

from e2e.cells import CELLS
from e2e.load import SUMMARY, summary_table
from e2e.runner import Cluster, HelperImages, build_helper_images, image_values

NAMESPACE = "e2e"
RELEASE = "e2e"
E2E_VALUES = CHART / "ci" / "e2e-values.yaml"
E2E_TLS_VALUES = CHART / "ci" / "e2e-tls-values.yaml"


@pytest.fixture(scope="session")
def podman_works() -> None:
    assert shutil.which("podman"), "podman is required: sudo scripts/install-test-tools.sh (installs podman, runc)"
    assert shutil.which("unshare"), "unshare (util-linux) is required to point the ingress host at nginx for Locust"
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    assert info.returncode == 0, f"podman cannot run here (CONTAINERS_CONF=scripts/containers.conf):\n{info.stderr}"


@pytest.fixture(scope="session")
def image(podman_works: None) -> str:
    return built_image()  # shared with the image tests: built once per session


@pytest.fixture(scope="session")
def helper_images(image: str) -> HelperImages:
    return build_helper_images()  # from the base the project's image was built on: after ``image``


def render(values: Path, image: str, set_values: list[str] = ()) -> list[dict]:
    return helm_template(values, release=RELEASE, namespace=NAMESPACE, set_values=[*image_values(image), *set_values],
                         include_hooks=False)


def started_cluster(documents: list[dict], workdir: Path, images: HelperImages,
                    secrets: dict[str, Path] | None = None) -> Iterator[Cluster]:
    cluster = Cluster(documents, NAMESPACE, workdir, images.nginx, images.pause, secrets)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        print(f"\ncontainer logs: {cluster.log_dir}")


@pytest.fixture(scope="module")
def cluster(image: str, helper_images: HelperImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(render(E2E_VALUES, image), tmp_path_factory.mktemp("e2e"), helper_images)


@pytest.fixture(scope="module")
def cells(image: str, helper_images: HelperImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """ci/e2e-values.yaml with `dask.cells: 2`: two DaskClusters (each with its own DaskAutoscaler),
    both schedulers in the API's SCHEDULER_ADDRESSES. One per module, like ``cluster``."""
    documents = render(E2E_VALUES, image, [f"dask.cells={CELLS}"])
    yield from started_cluster(documents, tmp_path_factory.mktemp("cells"), helper_images)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.write_sep("=", "cluster in a box: summary")
        terminalreporter.write_line(summary_table())
