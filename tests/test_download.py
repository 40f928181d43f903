"""The default-dataset download, against a local HTTP server only."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest

from bench.data.download import fetch
from core.errors import BenchError
from tests.conftest import toy_arrays


@pytest.fixture()
def server(tmp_path):
    images, labels = toy_arrays(4, 16)
    served = tmp_path / "served"
    served.mkdir()
    np.savez(served / "tiny.npz", train_images=images, train_labels=labels[:, None])
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=served))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    md5 = hashlib.md5((served / "tiny.npz").read_bytes()).hexdigest()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", md5, hits
    httpd.shutdown()


def test_download_once_with_md5(server, tmp_path):
    url, md5, hits = server
    dest = tmp_path / "cache" / "tiny.npz"
    assert fetch(f"{url}/tiny.npz", md5, dest) == dest
    assert np.load(dest)["train_images"].shape == (12, 16, 16, 3)
    fetch(f"{url}/tiny.npz", md5, dest)
    assert len(hits) == 1  # the second call used the cached file


def test_bad_md5_is_refused_and_nothing_kept(server, tmp_path):
    url, _, _ = server
    dest = tmp_path / "tiny.npz"
    with pytest.raises(BenchError, match="expected 0+; not used"):
        fetch(f"{url}/tiny.npz", "0" * 32, dest)
    assert not dest.exists() and not list(tmp_path.glob(".*part"))


def test_unreachable_server_says_where_to_put_the_data(tmp_path):
    with pytest.raises(BenchError, match="could not download .* put the data at /x") as err:
        fetch(
            "http://127.0.0.1:9/none.npz",
            "0" * 32,
            tmp_path / "n.npz",
            timeout=2,
            hint="put the data at /x",
        )
    assert "\n" not in str(err.value)


def test_runner_falls_back_to_the_download(server, tmp_path):
    from bench.config import load_config
    from bench.data.datasets import prepare_dataset

    url, md5, _ = server
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f"""
[run]
folds = 4
[data]
path = "missing_folder"
image_size = 16
[data.fallback]
url = "{url}/tiny.npz"
md5 = "{md5}"
classes = ["a", "b", "c"]
[profiles.p]
""")
    ds, path = prepare_dataset(load_config(cfg_file, profile="p"), show_progress=False)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 12
    assert path.name == "tiny.npz"
