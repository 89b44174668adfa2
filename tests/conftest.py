"""Shared test setup: hypothesis profiles, strict mode and image fixtures.

Profiles (``COWTREE_HYPOTHESIS``):

- ``ci`` (default): few examples and short stateful runs, so the whole suite
  stays within a few minutes on two cores.
- ``deep``: many more examples and longer runs, for a search before a
  release or after a change to the tree or the allocator.  The filesystem
  state machine alone ran for more than nine minutes on two cores.

Hypothesis prints the seed and a ``@reproduce_failure`` blob for every
failure.  Tests that draw from ``random`` take the ``rng`` fixture, which
prints its seed; ``COWTREE_SEED=N`` replays one.

``COWTREE_STRICT=1`` is set for the whole session, so every commit runs the
engine's checker (:func:`cowtree.check.check_volume`) and raises on any
problem.

The checkout that contains this file goes first on ``PYTHONPATH``, so the
``python -m cowtree`` processes the tests start (CLI runs, FUSE mounts) run
the code under test, not whatever copy pip last installed.
"""

from __future__ import annotations

import os
import random

os.environ["COWTREE_STRICT"] = "1"
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_CHECKOUT] + [part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part])

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from cowtree import ondisk  # noqa: E402
from cowtree.image import live, mkfs, open_image  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=12,
    stateful_step_count=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("deep", settings.get_profile("ci"), max_examples=300, stateful_step_count=120)
PROFILE = os.environ.get("COWTREE_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)


def pytest_report_header(config):
    return f"cowtree: hypothesis profile {PROFILE}, COWTREE_STRICT={os.environ['COWTREE_STRICT']}"


@pytest.fixture
def rng(request):
    """A seeded random.Random; the seed is printed and shown on failure."""
    seed = int(os.environ.get("COWTREE_SEED", random.randrange(1 << 32)))
    print(f"random seed for {request.node.nodeid}: COWTREE_SEED={seed}")
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


@pytest.fixture
def make_image(tmp_path):
    """Return a function that creates an image in tmp_path and returns (path, volume, live filesystem).

    Volumes it opened are closed when the test ends.
    """
    opened = []
    counter = iter(range(1 << 30))

    def make(nodesize: int = ondisk.MIN_NODE_SIZE, size_limit: int = 0, name: str | None = None):
        path = str(tmp_path / (name or f"image{next(counter)}.img"))
        volume = mkfs(path, size_limit=size_limit, nodesize=nodesize)
        opened.append(volume)
        return path, volume, live(volume)

    yield make
    for volume in opened:
        close_quietly(volume)


@pytest.fixture
def reopen():
    """Return a function that closes a volume and opens its image again for writing."""
    opened = []

    def reopen_volume(volume, writable: bool = True):
        path = volume.path
        volume.close()
        fresh = open_image(path, writable=writable)
        opened.append(fresh)
        return fresh, live(fresh)

    yield reopen_volume
    for volume in opened:
        close_quietly(volume)


def close_quietly(volume) -> None:
    """Close a volume that a test may already have closed (closing twice is harmless)."""
    volume.close()
