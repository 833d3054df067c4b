"""When the pool of writable layers refills (`enorm.disk.LayerPool`): not beside the start
of the container that took a layer, but at once when a burst has emptied it. The
layers are plain files here; making and mounting real ones is test_layer_pool's."""

from __future__ import annotations

import time

from enorm import disk


def eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def test_the_pool_refills_after_the_handshake_that_took_a_layer(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(disk, "make_image", lambda image, size: (made.append(image),
                                                                 image.write_bytes(b"x")))
    monkeypatch.setattr(disk, "mount_image", lambda image, target: target.mkdir())
    monkeypatch.setattr(disk.idmap, "bind", lambda src, dst: None)
    monkeypatch.setattr(disk.idmap, "unmount", lambda path: None)
    pool = disk.LayerPool(tmp_path / "pool", 64, 1)
    pool.start()
    try:
        assert eventually(lambda: pool.ready() == 1)
        images = []
        for i in range(3):
            (tmp_path / f"c{i}").mkdir()
            images.append(tmp_path / f"c{i}" / "overlay.img")

        assert pool.take(images[0], tmp_path / "c0" / "overlay")
        assert images[0].exists()
        time.sleep(0.3)  # its container is starting: no layer is made meanwhile
        assert pool.ready() == 0 and len(made) == 1
        pool.started(images[0])
        assert eventually(lambda: pool.ready() == 1) and len(made) == 2

        # A burst: one takes the last layer, the next finds none; the pool refills at
        # once, though the first has not said its container is up.
        assert pool.take(images[1], tmp_path / "c1" / "overlay")
        assert not pool.take(images[2], tmp_path / "c2" / "overlay")
        assert eventually(lambda: pool.ready() == 1) and len(made) == 3
        assert (pool.taken, pool.missed) == (2, 1)
    finally:
        pool.stop()
