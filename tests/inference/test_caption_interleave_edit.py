"""Captioning, interleaved generation and editing against uncached references; the edit training format."""

import torch

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.inference.caption import caption_images, caption_rows
from megafusion.inference.edit import edit_images, edit_prefix
from megafusion.inference.interleave import generate_interleaved
from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.sequence import pack_rows, prefill
from megafusion.inference.text import generate_tokens
from megafusion.inference.text_to_image import ImageSamplingConfig, sample_images
from megafusion.training.edit_objective import (
    EditTriplet,
    build_edit_example,
    collate_edit_examples,
    edit_diffusion_loss,
)
from tests.inference.helpers import VOCAB, force_special_tokens

N = 4


def latents(n, seed=0):
    return torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def uncached_greedy_after(model, ids, modality, images, n):
    """Reference: full forwards over [ids + generated], every image clean (t = 0)."""
    ids, modality, out = list(ids), list(modality), []
    t0 = torch.zeros(images.shape[0], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), torch.tensor([modality]), images=images, timesteps=t0).logits
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
            modality.append(0)
    return out


def test_caption_with_cache_equals_uncached_reference(model, tokenizer):
    z = latents(2)
    got = generate_tokens(model, caption_rows(model, z, [1, 7]), SamplingConfig(max_new_tokens=6))
    for i in range(2):
        ids = [1, 7, model.boi_id] + [0] * N + [model.eoi_id]
        modality = [0, 0, 0] + [1] * N + [0]
        assert got[i] == uncached_greedy_after(model, ids, modality, z[i : i + 1], 6)
    captions = caption_images(model, tokenizer, z, prompt="w7", sampling=SamplingConfig(max_new_tokens=6))
    assert captions == [tokenizer.decode(g, skip_special_tokens=True) for g in got]


def test_interleave_diffuses_in_place_and_continues_after_a_clean_image(model, tokenizer, monkeypatch):
    force_special_tokens(model, monkeypatch, eoi=0.0)  # BOI wins whenever it is allowed
    config = ImageSamplingConfig(sampler="ddpm", num_steps=3)
    out = generate_interleaved(model, tokenizer, "w3 w4 w5", SamplingConfig(max_new_tokens=5), config,
                               max_images=1, generator=torch.Generator().manual_seed(0))
    boi, eoi = model.boi_id, model.eoi_id
    assert out.token_ids[:2] == [boi, eoi] and all(t < VOCAB for t in out.token_ids[2:])
    assert isinstance(out.segments[0], torch.Tensor) and isinstance(out.segments[1], str)
    prompt = [1, 3, 4, 5]  # BOS w3 w4 w5: the tokenizer's prefix, then the words
    # The image is what text -> image sampling gives for the same prefix (the cache of everything so far)...
    expected = sample_images(model, [[prompt]], [[[1]]], config,
                             torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.segments[0][None], expected, atol=1e-5, rtol=0)
    # ...and the text after it is what a fresh model reading prompt BOI image(t=0) EOI would say.
    ids = prompt + [boi] + [0] * N + [eoi]
    modality = [0] * (len(prompt) + 1) + [1] * N + [0]
    monkeypatch.undo()
    force_special_tokens(model, monkeypatch, boi=-1e4, eoi=0.0)
    assert out.token_ids[2:] == uncached_greedy_after(model, ids, modality, expected, len(out.token_ids) - 2)


def test_edit_step_sees_clean_source_and_noisy_target_like_a_full_forward(model):
    """Cached edit denoising step == one forward over lead BOI src(t=0) EOI instr BOI tgt(t) with mixed t."""
    src, tgt = latents(1, 1), latents(1, 2)
    from megafusion.inference.denoise import predict_noise

    prefix = edit_prefix(model, src[0], [9, 10, 11], [1])
    with torch.no_grad():
        cache = prefill(model, [[*prefix, [model.boi_id]]]).cache
        got = predict_noise(model, cache, tgt, 300)
        packed = pack_rows(model, [[*prefix, [model.boi_id], tgt[0]]])
        ref = model(packed.input_ids, packed.modality, images=packed.images,
                    timesteps=torch.tensor([0, 300])).noise_pred[1:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_edit_images_runs_batched(model, tokenizer):
    out = edit_images(model, tokenizer, latents(2), ["w8 w9", "w10"], ImageSamplingConfig(num_steps=2),
                      torch.Generator().manual_seed(0))
    assert out.latents.shape == (2, 4, 4, 4) and out.images is None


def test_edit_training_example_matches_the_inference_layout_and_trains_the_target(model):
    src, tgt = latents(2, 3), latents(2, 4)
    ex = [build_edit_example(EditTriplet(src[i], [9, 10][: i + 1], tgt[i]), model, lead_ids=[1]) for i in range(2)]
    inference = pack_rows(model, [[*edit_prefix(model, src[0], [9], [1]), [model.boi_id], tgt[0], [model.eoi_id]]])
    assert ex[0].input_ids.tolist() == inference.input_ids[0].tolist()
    assert ex[0].modality.tolist() == inference.modality[0].tolist()
    batch = collate_edit_examples(ex)
    assert batch.noised.tolist() == [False, True, False, True]
    assert batch.doc_ids[0, -1].item() == -1 and batch.doc_ids[1, -1].item() == 0
    seen = {}
    model.unet_down.register_forward_hook(lambda mod, args, out: seen.update(images=args[0], t=args[1]))
    loss = edit_diffusion_loss(model, batch, DDPMSchedule(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.unet_up.conv_out.weight.grad is not None
    # Sources enter clean at t = 0; targets noised at t > 0 (with this seed).
    assert seen["t"][::2].tolist() == [0, 0] and bool((seen["t"][1::2] > 0).all())
    assert torch.equal(seen["images"][::2], src) and not torch.equal(seen["images"][1::2], tgt)
