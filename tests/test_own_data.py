"""A user's own image folder: torchvision folder conventions, checks at plan time, EXIF, no
synthetic styles unless asked, and client failures that stop the run (real Flower rounds)."""

import io
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from promptfolio.embedded import world
from promptfolio.embedded.export import export_imagefolder
from promptfolio.images import load_image
from training.data import DataError, DataPlan, read_imagefolder


def exif_rotated_jpeg(width: int = 40, height: int = 20) -> bytes:
    """A JPEG stored landscape whose EXIF says 'rotate 90° clockwise to view' (orientation 6)."""
    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 2, height))  # left half blue: shows which way it turned
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    """The embedded task in the blur style as a user's folder (6 classes x 12 images)."""
    src = export_imagefolder(world.calibrated("blur"), 12, seed=5, cache_dir=tmp_path / "cache")
    root = tmp_path / "photos"
    for name in world.CLASS_NAMES[:6]:
        shutil.copytree(src / name, root / name)
    return root


def test_folder_conventions_nested_empty_corrupt_hidden_and_exif(folder):
    first = sorted(p.name for p in folder.iterdir())[0]
    nested = folder / first / "2024" / "march"
    nested.mkdir(parents=True)
    (nested / "phone.jpg").write_bytes(exif_rotated_jpeg())
    (folder / first / "._phone.jpg").write_bytes(b"\x00\x05\x16\x07")  # a macOS fork: hidden, not an image
    (folder / first / "notes.txt").write_text("not an image")
    (folder / first / ".thumbnails").mkdir()
    (folder / first / ".thumbnails" / "t.png").write_bytes(b"cache, not a photo")
    read = read_imagefolder(folder)
    assert len(read.paths) == 6 * 12 + 1 and read.classes == sorted(world.CLASS_NAMES[:6])
    assert read.labels[read.paths.index(str(nested / "phone.jpg"))] == read.classes.index(first)
    upright = load_image(nested / "phone.jpg")
    assert upright.size == (20, 40)  # EXIF orientation applied
    assert upright.getpixel((10, 2))[2] > 150  # the blue half is on top after the turn

    (folder / "zebra").mkdir()
    (folder / "zebra" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="class folders without images in .*: zebra"):
        read_imagefolder(folder)
    shutil.rmtree(folder / "zebra")

    (folder / first / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    with pytest.raises(DataError, match=r"broken\.jpg: .*--skip-bad-images"):
        read_imagefolder(folder)
    read = read_imagefolder(folder, skip_bad=True)
    assert [p.endswith("broken.jpg") for p in read.skipped] == [True] and len(read.paths) == 6 * 12 + 1


def test_sixteen_bit_and_float_grey_images_keep_their_contrast():
    """A 16-bit grey PNG (medical and industrial cameras write them) is scaled to 8 bits, not clipped
    to white (or refused by the box reduce), at full size and reduced toward the encoder's size alike;
    a float grey PIL image in [0, 1] too."""
    import numpy as np

    ramp = np.arange(64 * 64, dtype=np.float64).reshape(64, 64) / (64 * 64 - 1)
    png = io.BytesIO()
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(png, "PNG")
    for source in (png.getvalue(), Image.fromarray(ramp.astype(np.float32))):
        for draft in (None, 16):
            pixels = np.asarray(load_image(source, draft_size=draft), dtype=np.float64)
            assert pixels.shape[2] == 3 and pixels[0, 0, 0] < 10 and pixels[-1, -1, 0] > 245
            assert abs(pixels.mean() - 127.5) < 3  # the ramp's mean, not white


def test_the_data_plan_round_trips_through_plan_json(folder, tmp_path):
    from training.config import TrainConfig
    from training.data import build_plan

    cfg = TrainConfig(data=str(folder), num_clients=2, beta=5.0, seed=3)
    plan = build_plan(cfg)
    plan.write(tmp_path / "plan.json")
    assert DataPlan.read(tmp_path / "plan.json") == plan
    assert cfg.style_shift == "none" and TrainConfig().style_shift == "own"
    assert {tuple(s) for c in plan.clients for s in c.train.styles} == {("clean", 0.0)}
    styled = build_plan(cfg.model_copy(update={"shift": "shared"}))  # asked for explicitly: applied
    assert {tuple(s)[0] for c in styled.clients for s in c.train.styles} == {"blur"}


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promptfolio.cli", "train", "--clients", "2", "--local-epochs", "1",
                           "--beta", "5", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=400)


def test_own_folder_trains_clean_refuses_bad_files_and_a_failed_client_is_left_out(folder, tmp_path):
    out = tmp_path / "run"
    (folder / sorted(p.name for p in folder.iterdir())[0] / "broken.jpg").write_bytes(b"not a jpeg at all")
    r = train_cli("--data", str(folder), "--rounds", "1", "--out", str(out))
    assert r.returncode == 2 and "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # the planning line and one error line

    r = train_cli("--data", str(folder), "--rounds", "1", "--out", str(out), "--skip-bad-images")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 unreadable skipped: broken.jpg" in r.stderr and "client 1: train" in r.stderr
    assert "DEPRECATED" not in r.stderr and "8.8.8.8" not in r.stderr and "Traceback" not in r.stderr
    plan = DataPlan.read(out / "plan.json")
    assert {tuple(s) for c in plan.clients for s in c.train.styles + c.test.styles} == {("clean", 0.0)}

    # a file that breaks after planning: that client fails; the run names it and goes on without it
    victim = plan.clients[1].train.paths[0]
    with open(victim, "r+b") as f:
        f.truncate(40)
    r = train_cli("--data", str(folder), "--rounds", "2", "--out", str(out), "--skip-bad-images", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    named = [line for line in r.stderr.splitlines() if line.startswith("round 2 (train): client 1 failed:")]
    assert len(named) == 1 and "the round goes on without it" in named[0] and "Traceback" not in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {(f["round"], f["client"], f["stage"]) for f in metrics["failed_clients"]} == \
        {(2, 1, "train"), (2, 1, "evaluate")}
    assert len(metrics["rounds"]) == 2 and metrics["rounds"][1]["answered"] == [0]
