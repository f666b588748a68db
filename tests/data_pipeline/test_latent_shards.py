"""precompute-latents: shards, manifest, skips, reruns, rank splitting (a tiny random VAE: fast and offline)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from megafusion.cli import main
from megafusion.data_pipeline.latent_shards import precompute_latents
from megafusion.data_pipeline.shard_format import read_index, read_shard


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16)
    vae.register_to_config(scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path, safe_serialization=True)
    return path


def _folder(root, n, bad=(), uncaptioned=()):
    root.mkdir()
    for i in range(n):
        img = root / f"img{i:02d}.png"
        if i in bad:
            img.write_bytes(b"not a png")
        else:
            Image.new("RGB", (20 + i, 16), (10 * i, 100, 200)).save(img)
        if i not in uncaptioned:
            (root / f"img{i:02d}.txt").write_text(f"caption {i}")
    return root


def test_shards_manifest_and_skips(tmp_path, tiny_vae):
    src = _folder(tmp_path / "src", 7, bad=(2,), uncaptioned=(5,))
    out = tmp_path / "out"
    summary = precompute_latents(tiny_vae, str(src), out, resolution=16, batch_size=3, shard_size=3, progress=False)
    assert summary.index_written and summary.samples_written == 5 and summary.shards_written == 3
    index = read_index(out)
    assert index["num_shards"] == 3 and index["num_samples"] == 5 and index["latent_shape"] == [4, 8, 8]
    assert index["resolution"] == 16 and index["latent_mode"] == "mean" and index["vae"]
    reasons = {e["key"].split("/")[-1].split(".")[0]: e["reason"] for e in index["skipped"]}
    assert "unreadable image" in next(r for k, r in reasons.items() if "img02" in k)
    assert any("img05" in k for k in reasons), reasons
    records = [r for k in range(3) for r in read_shard(out / f"shard-{k:06d}.tar", lambda *a: None)]
    assert [r.caption for r in records] == ["caption 0", "caption 1", "caption 3", "caption 4", "caption 6"]
    assert all(r.latent.dtype == torch.float16 and r.latent.shape == (4, 8, 8) for r in records)

    # The stored latent is the VAE posterior mean times scaling_factor.
    from megafusion.data_pipeline.sources import center_crop_resize, image_to_tensor

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    pixels = image_to_tensor(center_crop_resize(Image.open(src / "img00.png"), 16))[None]
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean[0] * 0.5
    torch.testing.assert_close(records[0].latent.float(), expected, atol=2e-3, rtol=1e-2)


def test_rerun_skips_finished_shards_and_ranks_split_the_work(tmp_path, tiny_vae):
    src = _folder(tmp_path / "src", 8)
    out = tmp_path / "out"
    first = precompute_latents(tiny_vae, str(src), out, resolution=16, shard_size=2, rank=0, world_size=2,
                               progress=False)
    assert first.shards_written == 2 and not first.index_written  # rank 1's shards are missing
    second = precompute_latents(tiny_vae, str(src), out, resolution=16, shard_size=2, rank=1, world_size=2,
                                progress=False)
    assert second.shards_written == 2 and second.index_written
    again = precompute_latents(tiny_vae, str(src), out, resolution=16, shard_size=2, rank=0, world_size=1,
                               progress=False)
    assert again.shards_written == 0 and again.shards_skipped == 4
    assert read_index(out)["num_samples"] == 8


def test_cli(tmp_path, tiny_vae, capsys):
    src = _folder(tmp_path / "src", 3)
    code = main(["precompute-latents", "--vae", str(tiny_vae), "--source", str(src), "--out", str(tmp_path / "o"),
                 "--resolution", "16", "--shard-size", "2"])
    assert code == 0 and "wrote 2 shards (3 samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "index.json").read_text())["num_samples"] == 3
    assert main(["precompute-latents", "--vae", str(tmp_path / "nope"), "--source", str(src), "--out",
                 str(tmp_path / "o2")]) == 2
    assert main(["precompute-latents", "--vae", str(tiny_vae), "--source", str(src), "--out", str(tmp_path / "o3"),
                 "--resolution", "16", "--augment-copies", "1", "--augment-rotate", "7"]) == 0
    index = json.loads((tmp_path / "o3" / "index.json").read_text())
    assert index["num_samples"] == 6 and index["augment"]["rotate_deg"] == 7.0
    assert main(["precompute-latents", "--vae", str(tiny_vae), "--source", str(src), "--out", str(tmp_path / "o4"),
                 "--augment-scale", "1.5", "--augment-copies", "1"]) == 2  # checked before any work
    assert "scale: must be in [0, 1)" in capsys.readouterr().err


def test_augmented_copies_are_encoded_and_recorded(tmp_path, tiny_vae):
    from megafusion.data_pipeline.augment import AffineJitter
    from megafusion.data_pipeline.sources import center_crop_resize, image_to_tensor

    src, out = _folder(tmp_path / "src", 3), tmp_path / "out"
    jitter = AffineJitter(copies=2, rotate_deg=20.0)
    summary = precompute_latents(tiny_vae, str(src), out, resolution=16, batch_size=4, shard_size=4, progress=False,
                                 augment=jitter)
    assert summary.samples_written == 9
    index = read_index(out)
    assert index["num_samples"] == 9 and index["augment"] == jitter.record()
    records = [r for k in range(3) for r in read_shard(out / f"shard-{k:06d}.tar", lambda *a: None)]
    assert [r.caption for r in records] == ["caption 0", "caption 1", "caption 2"] * 3
    # A copy's latent is the VAE's encoding of the transformed image (the copy's key draws the transform).
    copy = next(r for r in records if r.key.endswith("img01-aug2"))
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    image = jitter.transform(Image.open(src / "img01.png").convert("RGB"), copy.key)
    with torch.no_grad():
        want = vae.encode(image_to_tensor(center_crop_resize(image, 16))[None]).latent_dist.mode()[0] * 0.5
    torch.testing.assert_close(copy.latent.float(), want, atol=2e-3, rtol=1e-2)
    # Shards written with other settings are never mixed into a rerun.
    with pytest.raises(ValueError, match=r"shard-000000.tar: written with augmentation"):
        precompute_latents(tiny_vae, str(src), out, resolution=16, batch_size=4, shard_size=4, progress=False)
