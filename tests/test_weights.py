"""Checkpoints: downloads from a real local HTTP server, verification, cache, lock, import."""

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
import typer
from typer.testing import CliRunner

from vitreg.cli_weights import weights_app
from vitreg.errors import VitregError
from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig
from vitreg.weights import (
    build_model,
    fetch,
    import_official,
    list_checkpoints,
    load_registry,
    read_checkpoint,
    resolve,
    save_checkpoint,
)

SMALL = VitVNetConfig(
    img_size=(32, 32, 32), hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32,
    conv_first_channel=32,
)  # fmt: skip
FRAME = ModelFrame(orientation="RAS", spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32))
FILE = "/small.safetensors"

cli = typer.Typer()
cli.add_typer(weights_app, name="weights")
runner = CliRunner()


class Server:
    """A real HTTP server on 127.0.0.1 serving ``files``, counting GETs per path.

    ``drop_after`` bytes: announce the full Content-Length, send that many, close. ``release``:
    hold every body until the event is set (to make concurrent clients overlap).
    """

    def __init__(
        self,
        files: dict[str, bytes],
        drop_after: int | None = None,
        release: threading.Event | None = None,
    ):
        self.files, self.drop_after, self.release = files, drop_after, release
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
                if server.release is not None:
                    server.release.wait(timeout=60)
                if server.drop_after is not None:
                    self.wfile.write(body[: server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.release is not None:
            self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("src")
    return save_checkpoint(folder / "small.safetensors", VitVNet(SMALL), FRAME).read_bytes()


@pytest.fixture(autouse=True)
def no_user_settings(monkeypatch, tmp_path) -> None:
    """Every test starts with an empty cache of its own, online, on the shipped registry."""
    monkeypatch.setenv("VITREG_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITREG_REGISTRY", raising=False)
    monkeypatch.delenv("VITREG_OFFLINE", raising=False)


def use_registry(monkeypatch, tmp_path, url: str, body: bytes, sha256: str | None = None) -> Path:
    """Point vitreg at a registry whose 'small' (the default) is at ``url``; returns the cache."""
    registry = {
        "default": "small",
        "checkpoints": {
            "small": {
                "description": "reduced test model",
                "urls": [url],
                "sha256": sha256 or hashlib.sha256(body).hexdigest(),
                "size": len(body),
                "config": SMALL.to_dict(),
                "frame": FRAME.to_dict(),
                "licence": "test",
            }
        },
    }
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setenv("VITREG_REGISTRY", str(tmp_path / "registry.json"))
    return tmp_path / "cache"


def cache_files(cache: Path) -> list[str]:
    """Every file in the cache, in subfolders too, but the lock files."""
    files = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    return sorted(str(p.relative_to(cache)) for p in files)


def test_fetch_downloads_verifies_and_caches_once(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({FILE: checkpoint_bytes}) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        leftover = cache / ".downloads" / "small" / "tmp-of-a-killed-fetch"
        leftover.parent.mkdir(parents=True)
        leftover.write_bytes(b"partial")
        seen: list[tuple[int, int]] = []
        path = fetch("small", progress=lambda done, total: seen.append((done, total)))
        assert path == cache / "small.safetensors"
        assert path.read_bytes() == checkpoint_bytes
        assert seen[-1] == (len(checkpoint_bytes), len(checkpoint_bytes))
        assert resolve("default") == path and fetch("small") == path
        result = runner.invoke(cli, ["weights", "fetch", "small"])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str(path)
        assert server.gets == {FILE: 1}
    assert cache_files(cache) == ["small.safetensors"]
    model = build_model(read_checkpoint(path))
    assert model.config == SMALL and not model.training
    listing = json.loads(runner.invoke(cli, ["weights", "list", "--json"]).stdout)
    assert listing == [
        {
            "name": "small",
            "size": len(checkpoint_bytes),
            "cached": True,
            "default": True,
            "description": "reduced test model",
        }
    ]


def test_cli_fetch_draws_progress_on_stderr_only(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({FILE: checkpoint_bytes}) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        result = runner.invoke(cli, ["weights", "fetch", "default"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(cache / "small.safetensors")


def test_wrong_sha256_leaves_nothing_and_exits_2(monkeypatch, tmp_path, checkpoint_bytes):
    wrong = "0" * 64
    with Server({FILE: checkpoint_bytes}) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes, wrong)
        result = runner.invoke(cli, ["weights", "fetch", "small", "-q"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert message.startswith("vitreg: error:") and "small.safetensors" in message
    assert f"expected {wrong}" in message
    assert f"got {hashlib.sha256(checkpoint_bytes).hexdigest()}" in message
    assert cache_files(cache) == []


def test_a_file_larger_than_registered_is_stopped(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({FILE: checkpoint_bytes + b"extra"}) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        with pytest.raises(
            VitregError, match=f"larger than the registry's {len(checkpoint_bytes)}"
        ):
            fetch("small", progress=None)
    assert cache_files(cache) == []


def test_dropped_connection_leaves_no_partial_file(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({FILE: checkpoint_bytes}, drop_after=1000) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        with pytest.raises(VitregError, match="could not download checkpoint 'small'") as error:
            fetch("small", progress=None)
    assert f"of {len(checkpoint_bytes)} bytes" in str(error.value)
    assert "nothing was written" in str(error.value)
    assert cache_files(cache) == []


def test_second_mirror_is_tried_after_a_failed_one(monkeypatch, tmp_path, checkpoint_bytes):
    with Server({FILE: checkpoint_bytes}) as server:
        use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        registry = json.loads((tmp_path / "registry.json").read_text())
        registry["checkpoints"]["small"]["urls"].insert(0, server.url + "/missing")
        (tmp_path / "registry.json").write_text(json.dumps(registry))
        assert fetch("small", progress=None).read_bytes() == checkpoint_bytes
        assert server.gets == {"/missing": 1, FILE: 1}


def test_offline_mode_names_the_fetch_command(monkeypatch, tmp_path, checkpoint_bytes):
    use_registry(monkeypatch, tmp_path, "http://127.0.0.1:9/none", checkpoint_bytes)
    monkeypatch.setenv("VITREG_OFFLINE", "1")
    with pytest.raises(VitregError, match="offline.*vitreg weights fetch small"):
        resolve("small")
    monkeypatch.delenv("VITREG_OFFLINE")
    result = runner.invoke(cli, ["weights", "fetch", "small", "--offline"])
    assert result.exit_code == 2
    assert "offline" in result.output and "vitreg weights fetch small" in result.output


def test_unknown_names_and_missing_files_are_clear(monkeypatch, tmp_path, checkpoint_bytes):
    use_registry(monkeypatch, tmp_path, "http://127.0.0.1:9/none", checkpoint_bytes)
    with pytest.raises(VitregError, match="unknown checkpoint 'nope'; known: small"):
        resolve("nope")
    with pytest.raises(VitregError, match="nope.safetensors: no such checkpoint file"):
        resolve(str(tmp_path / "nope.safetensors"))


def test_two_concurrent_fetches_download_once(monkeypatch, tmp_path, checkpoint_bytes):
    release = threading.Event()
    with Server({FILE: checkpoint_bytes}, release=release) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        code = (
            "from vitreg.weights import fetch; print('ready', flush=True); "
            "print(fetch('small', progress=None))"
        )
        processes = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        # The body is held back until both processes are inside fetch(): they overlap.
        assert [p.stdout.readline().strip() for p in processes] == ["ready", "ready"]
        time.sleep(0.5)
        release.set()
        outputs = [p.communicate(timeout=60)[0].strip() for p in processes]
        assert [p.returncode for p in processes] == [0, 0]
        assert outputs == [str(cache / "small.safetensors")] * 2
        assert server.gets == {FILE: 1}
    assert cache_files(cache) == ["small.safetensors"]


def test_shipped_file_is_found_by_name_before_the_cache(monkeypatch, tmp_path, checkpoint_bytes):
    import vitreg.weights

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "mine.safetensors").write_bytes(checkpoint_bytes)
    monkeypatch.setattr(vitreg.weights, "shipped_dir", lambda: shipped)
    use_registry(monkeypatch, tmp_path, "http://127.0.0.1:9/none", checkpoint_bytes)
    assert resolve("mine", offline=True) == shipped / "mine.safetensors"
    rows = {row["name"]: row for row in list_checkpoints()}
    assert rows["mine"]["cached"] and not rows["small"]["cached"]


def test_shipped_registry_is_readable_and_honest(tmp_path):
    registry = load_registry()
    entry = registry.entries[registry.default]
    assert registry.default == "vitvnet-ixi-official" and entry.import_only
    assert VitVNetConfig.from_dict(entry.config) == VitVNetConfig()
    expected_frame = ModelFrame("LIA", (1, 1, 1), (160, 192, 224), intensity_divisor=255.0)
    assert ModelFrame.from_dict(entry.frame) == expected_frame
    assert (
        "FreeSurfer-normalised" in entry.frame_note
        and "divided intensities by 255" in entry.frame_note
    )
    with pytest.raises(VitregError, match="vitreg weights import FILE --name vitvnet-ixi"):
        resolve("default")
    result = runner.invoke(cli, ["weights", "info", "vitvnet-ixi-official", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["cached"] is False and info["config"] == VitVNetConfig().to_dict()
    assert not (tmp_path / "cache").exists()  # info never downloads


def official_training_file(path: Path, state: dict) -> Path:
    """Save like the authors' training script: epoch, state_dict (with the grid), optimizer."""
    model = VitVNet(SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    for parameter in model.parameters():  # gradients as after a backward pass, without one
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # Adam with amsgrad now holds step, exp_avg, exp_avg_sq, max_exp_avg_sq
    torch.save(
        {"epoch": 3, "state_dict": state, "best_dsc": 0.7, "optimizer": optimizer.state_dict()},
        path,
    )
    return path


def test_official_checkpoint_imports_and_runs(tmp_path):
    torch.manual_seed(0)
    source = VitVNet(SMALL).eval()
    grid = torch.zeros(1, 3, *SMALL.img_size)
    state = dict(source.state_dict(), **{"spatial_trans.grid": grid})
    file = official_training_file(tmp_path / "dsc0.700.pth.tar", state)
    out = import_official(file, "mine", config=SMALL)
    assert out == tmp_path / "cache" / "mine.safetensors"
    checkpoint = read_checkpoint(resolve("mine"))
    assert "spatial_trans.grid" not in checkpoint.state_dict
    assert checkpoint.recipe["epoch"] == 3 and checkpoint.recipe["best_dsc"] == 0.7
    assert checkpoint.recipe["source"] == file.name
    assert checkpoint.recipe["source_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert checkpoint.frame == ModelFrame(
        "LIA", (1.0, 1.0, 1.0), SMALL.img_size, intensity_divisor=255
    )
    assert "FreeSurfer-normalised" in checkpoint.recipe["frame_note"]
    model = build_model(checkpoint)
    inputs = torch.rand(1, 2, *SMALL.img_size)
    with torch.no_grad():
        flow = model(inputs)
        torch.testing.assert_close(flow, source(inputs))
    assert flow.shape == (1, 3, *SMALL.img_size)
    info = json.loads(runner.invoke(cli, ["weights", "info", "mine", "--json"]).stdout)
    assert info["recipe"]["epoch"] == 3 and info["path"] == str(out)


def test_bare_state_dict_imports_through_the_cli(monkeypatch, tmp_path):
    import vitreg.weights

    real_import = vitreg.weights.import_official
    monkeypatch.setattr(
        vitreg.weights, "import_official", lambda f, n: real_import(f, n, config=SMALL)
    )
    torch.save(VitVNet(SMALL).state_dict(), tmp_path / "bare.pth")
    result = runner.invoke(cli, ["weights", "import", str(tmp_path / "bare.pth"), "--name", "b"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "cache" / "b.safetensors")


class Payload:
    """Unpickling this would create a marker file: the test checks it never happens."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_import_refuses_missing_misshaped_and_pickled_objects(tmp_path):
    state = VitVNet(SMALL).state_dict()
    missing = {k: v for k, v in state.items() if k != "decoder.conv_more.0.weight"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(VitregError, match=r"missing.pth: .*'decoder\.conv_more\.0\.weight'"):
        import_official(tmp_path / "missing.pth", "x", config=SMALL)
    misshaped = dict(state, **{"reg_head.0.bias": torch.zeros(4)})
    torch.save({"state_dict": misshaped}, tmp_path / "misshaped.pth")
    with pytest.raises(VitregError, match=r"misshaped.pth: .*'reg_head\.0\.bias' has shape"):
        import_official(tmp_path / "misshaped.pth", "x", config=SMALL)

    payload = Payload()
    payload.marker = tmp_path / "executed"
    torch.save({"state_dict": state, "extra": payload}, tmp_path / "evil.pth")
    result = runner.invoke(cli, ["weights", "import", str(tmp_path / "evil.pth"), "--name", "x"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "evil.pth: refused by torch.load(weights_only=True)" in message
    assert not payload.marker.exists()
    assert not (tmp_path / "cache").exists() or cache_files(tmp_path / "cache") == []


def test_foreign_and_corrupt_files_are_not_checkpoints(tmp_path, checkpoint_bytes):
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(VitregError, match="junk.safetensors: not a vitreg checkpoint"):
        read_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(checkpoint_bytes[: len(checkpoint_bytes) // 2])
    with pytest.raises(VitregError, match="cut.safetensors: not a vitreg checkpoint"):
        read_checkpoint(tmp_path / "cut.safetensors")
    result = runner.invoke(cli, ["weights", "info", str(tmp_path / "junk.safetensors")])
    assert result.exit_code == 2 and "junk.safetensors" in result.output


def test_every_command_help_has_an_example():
    for command in ("list", "fetch", "info", "import"):
        result = runner.invoke(cli, ["weights", command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        assert f"Example: vitreg weights {command}" in " ".join(result.output.split())


def test_register_fetches_and_uses_weights_by_name(monkeypatch, tmp_path, checkpoint_bytes):
    """Integration with the main command: 'vitreg register --weights NAME' downloads once."""
    from tests.volumes import blob_image, grid_affine, write
    from vitreg.cli import app

    shape = (30, 30, 30)
    image = write(
        tmp_path / "f.nii.gz", blob_image(shape), grid_affine(2 * torch.eye(3).numpy(), shape)
    )
    with Server({FILE: checkpoint_bytes}) as server:
        cache = use_registry(monkeypatch, tmp_path, server.url + FILE, checkpoint_bytes)
        for _ in range(2):
            result = runner.invoke(
                app, ["register", str(image), str(image), "-o", str(tmp_path / "w.nii.gz"),
                      "--weights", "small", "--json", "-q"],
            )  # fmt: skip
            assert result.exit_code == 0, result.output
        assert server.gets == {FILE: 1}
    assert cache_files(cache) == ["small.safetensors"]
    assert json.loads(result.stdout.strip().splitlines()[-1])["weights"] == "small"
