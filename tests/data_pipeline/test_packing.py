"""Packing: no token lost or duplicated, mask ids consistent, images whole."""

import random

import pytest
import torch

from megafusion.data_pipeline.packing import IGNORE_INDEX, IMAGE, TEXT, SequencePacker, collate_packed
from megafusion.model.layout import TokenLayout

BOI, EOI, BOS, EOS, PAD = 100, 101, 1, 2, 0


def _packer(max_len=40, tokens=4):
    return SequencePacker(max_len, tokens, BOI, EOI, [BOS], EOS, PAD)


def test_document_layouts():
    p = _packer()
    lat = torch.zeros(4, 4, 4)
    cap = p.document("a", [7, 8], lat, image_first=False)
    assert cap.input_ids == [BOS, 7, 8, BOI, PAD, PAD, PAD, PAD, EOI, EOS]
    assert cap.modality == [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 2
    img = p.document("b", [7, 8], lat, image_first=True)
    assert img.input_ids == [BOS, BOI, PAD, PAD, PAD, PAD, EOI, 7, 8, EOS]
    assert img.modality == [TEXT, TEXT] + [IMAGE] * 4 + [TEXT] * 4


def test_long_caption_is_truncated_to_fit_and_image_must_fit():
    doc = _packer(max_len=12).document("a", list(range(3, 50)), torch.zeros(4, 4, 4), False)
    assert len(doc) == 12 and doc.modality.count(IMAGE) == 4
    with pytest.raises(ValueError, match="cannot hold one image"):
        _packer(max_len=7)


def test_packing_keeps_every_token_once_with_consistent_ids():
    p = _packer(max_len=40)
    rng = random.Random(0)
    docs, seqs = [], []
    for i in range(50):
        doc = p.document(f"k{i}", [rng.randrange(3, 90) for _ in range(rng.randrange(0, 15))],
                         torch.full((4, 4, 4), float(i)), image_first=rng.random() < 0.2)
        docs.append(doc)
        if (s := p.add(doc)) is not None:
            seqs.append(s)
    seqs.append(p.flush())
    assert p.flush() is None
    keys = [k for s in seqs for k in s.keys]
    assert keys == [d.key for d in docs]
    for s in seqs:
        assert s.input_ids.shape == (40,)
        # Reassemble each document from its doc id: exactly the document's tokens, in order.
        for j, key in enumerate(s.keys):
            doc = docs[int(key[1:])]
            sel = s.doc_ids == j
            assert s.input_ids[sel].tolist() == doc.input_ids and s.modality[sel].tolist() == doc.modality
            assert torch.equal(s.latents[j], doc.latent)
        pad = s.doc_ids == len(s.keys)
        assert (s.labels[pad] == IGNORE_INDEX).all() and (s.labels[s.modality == IMAGE] == IGNORE_INDEX).all()
        text = (s.modality == TEXT) & ~pad
        assert torch.equal(s.labels[text], s.input_ids[text])


def test_collated_batch_is_a_valid_model_layout():
    p = _packer(max_len=30)
    seqs = []
    for i in range(12):
        if (s := p.add(p.document(f"k{i}", [5] * (i % 6), torch.full((4, 4, 4), float(i)), i % 3 == 0))):
            seqs.append(s)
    batch = collate_packed(seqs[:3])
    assert batch["latents"].shape[0] == batch["image_first"].shape[0] == len(batch["keys"])
    layout = TokenLayout.build(batch["input_ids"], batch["modality"], doc_ids=batch["doc_ids"], tokens_per_image=4)
    assert layout.num_images == batch["latents"].shape[0]
    # Image k of the batch is the k-th key's latent (row-major order).
    for k, key in enumerate(batch["keys"]):
        assert batch["latents"][k].flatten()[0].item() == float(key[1:])
