"""The image lock: one writer, or any number of readers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import cowtree
from cowtree.errors import ImageInUseError
from cowtree.image import open_image


def test_second_writer_rejected(make_image):
    path, volume, _ = make_image()
    with pytest.raises(ImageInUseError) as caught:
        open_image(path, writable=True)
    assert path in str(caught.value)
    assert "in use" in str(caught.value)


def test_reader_rejected_while_writer_holds(make_image):
    path, volume, _ = make_image()
    with pytest.raises(ImageInUseError):
        open_image(path)


def test_readers_share_then_writer_rejected(make_image):
    path, volume, _ = make_image()
    volume.close()
    first = open_image(path)
    second = open_image(path)
    try:
        with pytest.raises(ImageInUseError):
            open_image(path, writable=True)
    finally:
        first.close()
        second.close()


def test_lock_released_on_close(make_image):
    path, volume, _ = make_image()
    volume.close()
    again = open_image(path, writable=True)
    again.close()


def test_writer_in_another_process_rejected(make_image, tmp_path):
    """A writer in a child process keeps this process from opening the image for writing."""
    path, volume, _ = make_image()
    volume.close()
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys
        from cowtree.image import open_image
        volume = open_image({path!r}, writable=True)
        open({str(ready)!r}, "w").close()
        sys.stdin.read()
        volume.close()
    """)
    source_root = os.path.dirname(os.path.dirname(cowtree.__file__))
    env = dict(os.environ, PYTHONPATH=source_root)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, env=env)
    try:
        for _ in range(200):
            if ready.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "the child process did not open the image"
        with pytest.raises(ImageInUseError):
            open_image(path, writable=True)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    open_image(path, writable=True).close()
