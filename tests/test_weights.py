"""Checkpoints: download from a real local HTTP server, verification, cache, lock, import."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.volumes import blob_image, grid_affine, write
from vitreg.cli import app
from vitreg.errors import VitregError
from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig
from vitreg.weights import (
    build_model,
    fetch,
    import_official,
    read_checkpoint,
    resolve,
    save_checkpoint,
)

SMALL = VitVNetConfig(
    img_size=(32, 32, 32), hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32,
    conv_first_channel=32,
)  # fmt: skip
FRAME = ModelFrame(orientation="RAS", spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32))
runner = CliRunner()


class Server:
    """A real HTTP server on 127.0.0.1 serving files from a dict, counting GETs per path."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0, drop_after: int | None = None):
        self.files, self.delay, self.drop_after = files, delay, drop_after
        self.gets: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.gets[self.path] = server.gets.get(self.path, 0) + 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for start in range(0, len(body), 1 << 16):
                    self.wfile.write(body[start : start + (1 << 16)])
                    time.sleep(server.delay)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def checkpoint_bytes(tmp_path) -> bytes:
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "src" / "small.safetensors", VitVNet(SMALL), FRAME)
    return path.read_bytes()


def use_registry(monkeypatch, tmp_path, url: str, body: bytes, sha256: str | None = None) -> Path:
    """Point vitreg at a registry naming ``url`` and at an empty cache; returns the cache."""
    registry = {
        "default": "small",
        "checkpoints": {
            "small": {
                "description": "reduced test model",
                "urls": [url],
                "sha256": sha256 or hashlib.sha256(body).hexdigest(),
                "size": len(body),
                "frame": FRAME.to_dict(),
                "licence": "test",
            }
        },
    }
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    cache = tmp_path / "cache"
    monkeypatch.setenv("VITREG_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("VITREG_HOME", str(cache))
    monkeypatch.delenv("VITREG_OFFLINE", raising=False)
    return cache


def test_fetch_downloads_verifies_and_caches_once(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({"/small.safetensors": checkpoint_bytes}) as server:
        cache = use_registry(
            monkeypatch, tmp_path, f"{server.url}/small.safetensors", checkpoint_bytes
        )
        seen = []
        path = fetch("small", progress=lambda done, total: seen.append((done, total)))
        assert path == cache / "small.safetensors"
        assert path.read_bytes() == checkpoint_bytes
        assert seen and seen[-1] == (len(checkpoint_bytes), len(checkpoint_bytes))
        assert resolve("default") == path
        result = runner.invoke(app, ["weights", "fetch", "small", "-q"])
        assert result.exit_code == 0, result.output
        assert server.gets == {"/small.safetensors": 1}
    model = build_model(read_checkpoint(path))
    assert model.config == SMALL
    listing = json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)
    assert listing == [
        {
            "name": "small",
            "size": len(checkpoint_bytes),
            "cached": True,
            "default": True,
            "description": "reduced test model",
        }
    ]


def test_wrong_sha256_leaves_nothing_and_exits_2(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({"/small.safetensors": checkpoint_bytes}) as server:
        cache = use_registry(
            monkeypatch, tmp_path, f"{server.url}/small.safetensors", checkpoint_bytes, "0" * 64
        )
        result = runner.invoke(app, ["weights", "fetch", "small", "-q"])
    assert result.exit_code == 2
    actual = hashlib.sha256(checkpoint_bytes).hexdigest()
    assert "sha256 mismatch" in result.output and "0" * 64 in result.output
    assert actual in result.output
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_dropped_connection_leaves_no_partial_file(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({"/small.safetensors": checkpoint_bytes}, drop_after=1000) as server:
        cache = use_registry(
            monkeypatch, tmp_path, f"{server.url}/small.safetensors", checkpoint_bytes
        )
        with pytest.raises(VitregError, match="could not download 'small'"):
            fetch("small")
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_offline_mode_names_the_fetch_command(monkeypatch, tmp_path, checkpoint_bytes):
    use_registry(monkeypatch, tmp_path, "http://127.0.0.1:9/none", checkpoint_bytes)
    monkeypatch.setenv("VITREG_OFFLINE", "1")
    with pytest.raises(VitregError, match="vitreg weights fetch small"):
        resolve("small")
    monkeypatch.delenv("VITREG_OFFLINE")
    result = runner.invoke(app, ["weights", "fetch", "small", "--offline"])
    assert result.exit_code == 2 and "offline" in result.output
    with pytest.raises(VitregError, match="unknown checkpoint 'nope'"):
        resolve("nope")


def test_two_concurrent_fetches_download_once(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({"/small.safetensors": checkpoint_bytes}, delay=0.05) as server:
        cache = use_registry(
            monkeypatch, tmp_path, f"{server.url}/small.safetensors", checkpoint_bytes
        )
        code = "from vitreg.weights import fetch; print(fetch('small'))"
        processes = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
        assert [p.returncode for p in processes] == [0, 0]
        assert outputs == [str(cache / "small.safetensors")] * 2
        assert server.gets == {"/small.safetensors": 1}


def official_training_file(path: Path, state: dict) -> Path:
    """Save like the authors' train script: epoch, state_dict (with the grid), optimizer."""
    model = VitVNet(SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    model(torch.rand(2, 2, *SMALL.img_size)).mean().backward()
    optimizer.step()
    torch.save(
        {"epoch": 3, "state_dict": state, "best_dsc": 0.7, "optimizer": optimizer.state_dict()},
        path,
    )
    return path


def test_official_checkpoint_imports_and_registers(monkeypatch, tmp_path):
    monkeypatch.setenv("VITREG_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    source = VitVNet(SMALL)
    state = dict(source.state_dict(), **{"spatial_trans.grid": torch.zeros(1, 3, 32, 32, 32)})
    file = official_training_file(tmp_path / "dsc0.700.pth.tar", state)
    out = import_official(file, "mine", config=SMALL, frame=FRAME)
    assert out == tmp_path / "cache" / "mine.safetensors"
    checkpoint = read_checkpoint(resolve(str(out)))
    assert "spatial_trans.grid" not in checkpoint.state_dict
    assert checkpoint.recipe["epoch"] == 3 and checkpoint.frame == FRAME
    info = runner.invoke(app, ["weights", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    details = json.loads(info.stdout)
    assert details["config"]["img_size"] == [32, 32, 32]
    assert details["frame"] == FRAME.to_dict() and details["recipe"]["epoch"] == 3
    model = build_model(checkpoint)
    inputs = torch.rand(1, 2, *SMALL.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), source.eval()(inputs))

    image = write(
        tmp_path / "f.nii.gz",
        blob_image((30, 30, 30)),
        grid_affine(torch.eye(3).numpy() * 2, (30, 30, 30)),
    )
    result = runner.invoke(
        app, ["register", str(image), str(image), "-o", str(tmp_path / "w.nii.gz"),
              "--weights", str(out), "--json", "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == str(out)


def test_import_refuses_missing_misshaped_and_pickled_objects(monkeypatch, tmp_path):
    monkeypatch.setenv("VITREG_HOME", str(tmp_path / "cache"))
    state = VitVNet(SMALL).state_dict()
    missing = {k: v for k, v in state.items() if k != "decoder.conv_more.0.weight"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(VitregError, match="decoder.conv_more.0.weight"):
        import_official(tmp_path / "missing.pth", "x", config=SMALL)
    misshaped = dict(state, **{"reg_head.0.bias": torch.zeros(4)})
    torch.save({"state_dict": misshaped}, tmp_path / "misshaped.pth")
    with pytest.raises(VitregError, match=r"reg_head\.0\.bias"):
        import_official(tmp_path / "misshaped.pth", "x", config=SMALL)
    torch.save({"state_dict": state, "payload": Path("/etc/passwd")}, tmp_path / "evil.pth")
    result = runner.invoke(app, ["weights", "import", str(tmp_path / "evil.pth"), "--name", "x"])
    assert result.exit_code == 2 and "cannot be loaded safely" in result.output
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_foreign_files_are_not_checkpoints(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(VitregError, match="junk.safetensors: not a vitreg checkpoint"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_register_finds_fetches_and_uses_weights_by_name(monkeypatch, tmp_path, checkpoint_bytes):
    shape = (30, 30, 30)
    image = write(
        tmp_path / "f.nii.gz", blob_image(shape), grid_affine(torch.eye(3).numpy(), shape)
    )
    with Server({"/small.safetensors": checkpoint_bytes}) as server:
        cache = use_registry(
            monkeypatch, tmp_path, f"{server.url}/small.safetensors", checkpoint_bytes
        )
        for _ in range(2):
            result = runner.invoke(
                app, ["register", str(image), str(image), "-o", str(tmp_path / "w.nii.gz"),
                      "--weights", "small", "--json"],
            )  # fmt: skip
            assert result.exit_code == 0, result.output
        assert server.gets == {"/small.safetensors": 1}
    assert (cache / "small.safetensors").is_file()
    assert json.loads(result.stdout.strip().splitlines()[-1])["weights"] == "small"
