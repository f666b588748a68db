"""The streaming loader: rank/worker split, ordering ratio, corrupt shards, and exact resume."""

from collections import Counter

import pytest
import torch

from megafusion.data_pipeline.loader import LatentSequenceStream, LoaderSettings, build_loader
from megafusion.data_pipeline.tokenizer import write_byte_level_tiktoken as write_byte_tiktoken
from tests.data_pipeline.shard_helpers import make_latent_shards

BOI, EOI = 512, 513


def _stream(tmp_path, shards, rank=0, world=1, **cfg):
    tok = write_byte_tiktoken(tmp_path / "tokenizer.model")
    base = dict(max_len=64, shuffle_buffer=8, num_workers=2, seed=3)
    base.update(cfg)
    return LatentSequenceStream(shards, tok, tokens_per_image=4, boi_id=BOI, eoi_id=EOI, cfg=LoaderSettings(**base),
                                rank=rank, world_size=world)


def _sample_ids(batch):
    return [int(x) for x in batch["latents"][:, 0, 0, 0].tolist()]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world, workers", [(2, 2), (4, 0)])
def test_one_epoch_delivers_every_sample_exactly_once_across_ranks_and_workers(tmp_path, world, workers):
    """8 shards of 10 samples over 4 readers (ranks x workers): each reader owns 2 whole shards, so its first 20
    documents are its share of epoch 0 (shuffle_buffer=1 keeps epochs apart). Together the shares must hold the
    80 samples exactly once: none missing, none read by two ranks or two workers."""
    shards = make_latent_shards(tmp_path / "s", num_shards=8, per_shard=10)
    readers = world * max(1, workers)
    per_reader = 80 // readers
    shares = []
    for rank in range(world):
        stream = _stream(tmp_path, shards, rank=rank, world=world, shuffle_buffer=1, num_workers=workers)
        per_worker = [[] for _ in range(max(1, workers))]
        it = iter(build_loader(stream, batch_size=2))
        step = 0
        while min(map(len, per_worker)) < per_reader:
            assert step < 60, f"rank {rank}: a worker delivered fewer than {per_reader} documents in 60 batches"
            batch = next(it)
            ids = _sample_ids(batch)
            assert batch["keys"] == [f"src-{i}" for i in ids], "a document's key and latent come from one sample"
            # A DataLoader hands out its workers' batches in turn: batch n comes from worker n % num_workers.
            per_worker[step % len(per_worker)] += ids
            step += 1
        del it
        shares += [worker_ids[:per_reader] for worker_ids in per_worker]
    first_epoch = [i for share in shares for i in share]
    repeated = sorted(i for i, n in Counter(first_epoch).items() if n > 1)
    assert not repeated, f"samples delivered more than once in epoch 0: {repeated}"
    missing = sorted(set(range(80)) - set(first_epoch))
    assert not missing, f"samples missing from epoch 0: {missing}"
    assert sorted(first_epoch) == list(range(80))


def test_caption_first_ratio_is_honoured(tmp_path):
    shards = make_latent_shards(tmp_path / "s", num_shards=2, per_shard=50)
    loader = build_loader(_stream(tmp_path, shards, num_workers=0), batch_size=4)
    flags = torch.cat([b["image_first"] for b in _take(loader, 60)])
    assert flags.numel() > 500
    assert abs(flags.float().mean().item() - 0.2) < 0.05


@pytest.mark.parametrize("world", [1, 2])
def test_caption_first_curriculum_switches_at_the_readers_epoch_fraction(tmp_path, world):
    """All caption-first for the first 0.5 epoch of each reader's share, all image-first after: with the order
    unshuffled (shuffle_buffer=1), a reader's first half of its positions holds exactly the caption-first
    documents, and its whole second epoch is image-first."""
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=10)
    share = 40 // world
    for rank in range(world):
        stream = _stream(tmp_path, shards, rank=rank, world=world, num_workers=0, shuffle_buffer=1,
                         caption_first_prob=1.0, caption_first_prob_late=0.0, caption_first_late_epoch=0.5)
        flags = torch.cat([b["image_first"] for b in _take(build_loader(stream, batch_size=1), 2 * share)])
        assert len(flags) >= 2 * share
        assert not flags[: share // 2].any(), "caption-first before the switch"
        assert flags[share // 2 : 2 * share].all(), "image-first from half of the reader's first epoch on"
    assert LoaderSettings(caption_first_prob=0.6).caption_first_prob_at(9.0) == 0.6
    with pytest.raises(ValueError, match="caption_first_prob_late"):
        LoaderSettings(caption_first_prob_late=1.5)
    with pytest.raises(ValueError, match="caption_first_late_epoch"):
        LoaderSettings(caption_first_prob_late=0.5, caption_first_late_epoch=-1)


def _doc_layouts(batch):
    """(BOI right after the tokenizer's BOS, image first) per document, in the order images are numbered in."""
    layouts = []
    for ids, docs in zip(batch["input_ids"], batch["doc_ids"], strict=True):
        for d in docs.unique().tolist():
            tokens = ids[docs == d]
            if (tokens == BOI).any():
                layouts.append(int(tokens[1]) == BOI)
    return [(starts, bool(f)) for starts, f in zip(layouts, batch["image_first"].tolist(), strict=True)]


def test_caption_dropout_leaves_caption_first_images_without_a_caption(tmp_path):
    """caption_dropout_prob=0.5 of caption_first_prob=0.8: ~40% of documents are "BOI image EOI EOS" and are not
    image-first (so they get the full timestep range); image-first documents stay ~20%."""
    shards = make_latent_shards(tmp_path / "s", num_shards=2, per_shard=50)
    stream = _stream(tmp_path, shards, num_workers=0, caption_dropout_prob=0.5)
    layouts = [x for b in _take(build_loader(stream, batch_size=4), 60) for x in _doc_layouts(b)]
    assert len(layouts) > 500
    dropped = sum(starts and not first for starts, first in layouts) / len(layouts)
    image_first = sum(first for _, first in layouts) / len(layouts)
    assert abs(dropped - 0.4) < 0.06 and abs(image_first - 0.2) < 0.05
    assert all(starts for starts, first in layouts if first), "an image-first document starts with BOI"
    plain = _stream(tmp_path, shards, num_workers=0)
    assert not any(starts and not first for b in _take(build_loader(plain, batch_size=4), 20)
                   for starts, first in _doc_layouts(b)), "without dropout every caption-first doc has a caption"
    with pytest.raises(ValueError, match="caption_dropout_prob"):
        LoaderSettings(caption_dropout_prob=1.0)


def test_too_few_shards_is_a_clear_error_or_resampled(tmp_path):
    shards = make_latent_shards(tmp_path / "s", num_shards=3, per_shard=4)
    with pytest.raises(ValueError, match="3 shards for 2 ranks x 2 workers"):
        _stream(tmp_path, shards, world=2)
    stream = _stream(tmp_path, shards, world=2, resample_shards=True)
    assert len(_take(build_loader(stream, batch_size=2), 3)) == 3


def test_corrupt_shard_is_skipped_and_the_rest_arrives(tmp_path, caplog):
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=10, corrupt=(1,))
    loader = build_loader(_stream(tmp_path, shards, num_workers=0, shuffle_buffer=1), batch_size=1)
    seen = set()
    with caplog.at_level("WARNING"):
        for batch in _take(loader, 40):
            seen.update(_sample_ids(batch))
    good = set(range(0, 10)) | set(range(20, 40))
    assert good <= seen
    assert "unreadable tar" in caplog.text and "shard-000001.tar" in caplog.text
    assert len(seen & set(range(10, 20))) < 10


def _complete_samples(tar_path) -> set[str]:
    """Keys whose three members (latent, caption, meta) are whole in a possibly truncated tar, read with the
    standard library's tarfile (independent of webdataset)."""
    import tarfile

    members: dict[str, set[str]] = {}
    try:
        with tarfile.open(tar_path, "r|") as tar:
            for m in tar:
                tar.extractfile(m).read()  # raises if the member's data is cut
                key, _, ext = m.name.partition(".")
                members.setdefault(key, set()).add(ext)
    except (tarfile.TarError, OSError):
        pass
    return {k for k, exts in members.items() if exts == {"latent.npy", "txt", "json"}}


def test_truncated_shard_delivers_its_readable_samples_and_counts_the_rest(tmp_path):
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=10)
    damaged = shards / "shard-000001.tar"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 3])
    readable = {10 + int(k) for k in _complete_samples(damaged)}
    assert 0 < len(readable) < 10, "the cut must leave some, not all, samples readable"
    it = iter(build_loader(_stream(tmp_path, shards, num_workers=0, shuffle_buffer=1), batch_size=1))
    seen: list[int] = []
    health = (0, 0, 0)
    for _ in range(60):
        batch = next(it)
        seen += _sample_ids(batch)
        health = batch["reader_health"][-1]
        if health[2]:
            break
    assert health[2] == 1, "the damaged shard was not counted"
    assert {i for i in seen if 10 <= i < 20} == readable, "exactly the readable samples of the damaged shard"
    assert health[1] == 10 - len(readable)


@pytest.mark.parametrize("workers, curriculum", [(0, {}), (2, {}),
                                               (2, dict(caption_first_prob_late=0.3, caption_first_late_epoch=0.7))])
def test_resume_reproduces_the_uninterrupted_batches(tmp_path, workers, curriculum):
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=12)
    stream = _stream(tmp_path, shards, num_workers=workers, **curriculum)
    full = _take(build_loader(stream, batch_size=2), 14)

    loader = build_loader(_stream(tmp_path, shards, num_workers=workers, **curriculum), batch_size=2)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    del it, loader

    resumed = build_loader(_stream(tmp_path, shards, num_workers=workers, **curriculum), batch_size=2)
    resumed.load_state_dict(state)
    after = _take(resumed, 9)
    for expected, got in zip(full[5:], after, strict=True):
        assert got["keys"] == expected["keys"]
        for name in ("input_ids", "modality", "doc_ids", "labels", "latents", "image_first"):
            assert torch.equal(got[name], expected[name]), name
