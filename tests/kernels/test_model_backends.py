"""The whole model with attention = triton / flex and routing = triton gives the logits, noise predictions, losses
and gradients of the sdpa / index reference (tiny random model; Triton through the CPU interpreter)."""

import os

# Must be set before triton is imported (kernels are created as interpreted functions at import).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from megafusion.config.loader import config_from_dict  # noqa: E402
from megafusion.diffusion.schedule import DDPMSchedule  # noqa: E402
from megafusion.model import LlamaFusion, ModalityRouter  # noqa: E402
from megafusion.model import attention as attention_module  # noqa: E402
from megafusion.model.layout import image_ids_in_order  # noqa: E402
from megafusion.training.objective import TransfusionObjective  # noqa: E402
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama  # noqa: E402
from tests.kernels.layouts import rel_err  # noqa: E402

needs_triton = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("triton"),
    reason="triton is not installed (pip install triton); the Triton kernels are optional",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path, "gqa-untied")
    torch.manual_seed(0)
    m = LlamaFusion.from_llama(path, separation="deep", image=TINY_IMAGE, unet=TINY_UNET)
    # Make the image set differ from the text set, so a row routed through the wrong weights shows up.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".image." in name:
                p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """32-token tiles so the 38-token test sequences span 2 x 2 tiles (the CUDA default is 64; the kernel tests use
    16-token tiles on their own)."""
    monkeypatch.setattr(attention_module, "TRITON_BLOCK_M", 32)
    monkeypatch.setattr(attention_module, "TRITON_BLOCK_N", 32)
    # Eager FlexAttention: compiling per test shape would cost tens of seconds (the compiled path is tested in
    # test_flex.py).
    monkeypatch.setenv("MEGAFUSION_FLEX_COMPILE", "0")


def _batch(model):
    """Two rows of 41 tokens: caption-first and image-first documents packed together, adjacent images."""
    n = model.image_config.tokens_per_image
    boi, eoi = model.boi_id, model.eoi_id
    g = torch.Generator().manual_seed(0)

    def text(k):
        return [("t", int(t)) for t in torch.randint(0, model.arch.vocab_size, (k,), generator=g)]

    def image():
        return [("t", boi)] + [("i", 0)] * n + [("t", eoi)]

    rows = [
        (text(5) + image() + text(4), text(3) + image() + image() + text(8)),
        (image() + text(9), text(2) + image() + text(6) + image() + text(3)),
    ]
    ids, mod, docs = [], [], []
    for first, second in rows:
        tokens = first + second
        ids.append([t for _, t in tokens])
        mod.append([int(kind == "i") for kind, _ in tokens])
        docs.append([0] * len(first) + [1] * len(second))
    num_images = sum(m.count(1) for m in mod) // n
    c, s = model.image_config.latent_channels, model.image_config.latent_size
    return {
        "input_ids": torch.tensor(ids),
        "modality": torch.tensor(mod),
        "doc_ids": torch.tensor(docs),
        "images": torch.randn(num_images, c, s, s, generator=g),
        "timesteps": torch.randint(0, 1000, (num_images,), generator=g),
    }


def _use(model, attention, routing):
    model.attention_backend, model.routing_backend = attention, routing


def _forward(model, batch, attention, routing):
    _use(model, attention, routing)
    try:
        with torch.no_grad():
            return model(**batch)
    finally:
        _use(model, "sdpa", "index")


BACKENDS = [
    pytest.param("triton", "triton", marks=needs_triton),
    pytest.param("triton", "index", marks=needs_triton),
    pytest.param("sdpa", "triton", marks=needs_triton),
    ("flex", "index"),
]


@pytest.mark.parametrize("attention, routing", BACKENDS)
def test_logits_and_noise_predictions_match_reference(model, attention, routing):
    batch = _batch(model)
    ref = _forward(model, batch, "sdpa", "index")
    out = _forward(model, batch, attention, routing)
    assert ref.logits.shape[1] % 32 and ref.noise_pred.shape[0] == 6
    for name in ("logits", "special_logits", "noise_pred"):
        assert rel_err(getattr(out, name), getattr(ref, name)) < 1e-4, name


def _loss_and_grads(model, batch, attention, routing):
    _use(model, attention, routing)
    try:
        model.zero_grad(set_to_none=True)
        objective = TransfusionObjective(DDPMSchedule(), loss_weight=5.0)
        out = objective(model, batch["input_ids"], batch["modality"], latents=batch["images"],
                        doc_ids=batch["doc_ids"], generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads
    finally:
        _use(model, "sdpa", "index")
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("attention, routing", [BACKENDS[0], BACKENDS[3]])
@pytest.mark.parametrize("text_trainable", [False, True])
def test_losses_and_gradients_match_reference(model, attention, routing, text_trainable):
    for name, p in model.named_parameters():
        p.requires_grad_(text_trainable or LlamaFusion.parameter_group(name) == "image")
    try:
        batch = _batch(model)
        ref, ref_grads = _loss_and_grads(model, batch, "sdpa", "index")
        out, grads = _loss_and_grads(model, batch, attention, routing)
    finally:
        model.requires_grad_(True)
    for name in ("lm_loss", "diffusion_loss", "loss"):
        assert rel_err(getattr(out, name), getattr(ref, name)) < 1e-5, name
    assert grads.keys() == ref_grads.keys()
    assert any(".text." in n for n in grads) == text_trainable
    for name, g in ref_grads.items():
        if float(g.abs().max()) > 0:
            assert rel_err(grads[name], g) < 1e-4, name


@pytest.mark.parametrize("attention", [pytest.param("triton", marks=needs_triton), "flex"])
def test_kv_cached_continuation_matches_reference(model, attention):
    """A prompt cached once, then a chunk (text + a whole image) attending to [cache + chunk]."""
    batch = _batch(model)
    split = 24
    assert batch["modality"][:, split - 1 : split + 1].eq(0).all(), "the split must fall between images"
    first = {k: batch[k][:, :split] for k in ("input_ids", "modality", "doc_ids")}
    second = {k: batch[k][:, split:] for k in ("input_ids", "modality", "doc_ids")}
    # Images are numbered row-major: pick each chunk's own images, in that chunk's row-major order.
    ids = image_ids_in_order(batch["modality"], model.image_config.tokens_per_image)
    chunk_images = [torch.unique(part[part >= 0]) for part in (ids[:, :split], ids[:, split:])]
    imgs, ts = batch["images"], batch["timesteps"]

    def run(backend):
        _use(model, backend, "index")
        try:
            with torch.no_grad():
                a, b = chunk_images
                cached = model(**first, images=imgs[a], timesteps=ts[a], use_cache=True)
                return model(**second, images=imgs[b], timesteps=ts[b], kv_cache=cached.kv_cache)
        finally:
            _use(model, "sdpa", "index")

    ref, out = run("sdpa"), run(attention)
    assert rel_err(out.logits, ref.logits) < 1e-4
    assert rel_err(out.noise_pred, ref.noise_pred) < 1e-4


def test_backends_are_config_values_and_checkpoint_metadata(tmp_path, model):
    cfg = config_from_dict({"model": {"attention": "flex", "routing": "triton"}})
    assert (cfg.model.attention, cfg.model.routing) == ("flex", "triton")
    assert (config_from_dict({}).model.attention, config_from_dict({}).model.routing) == ("sdpa", "index")
    with pytest.raises(ValueError, match="routing"):
        config_from_dict({"model": {"routing": "gather"}})
    with pytest.raises(ValueError, match="routing"):
        LlamaFusion(model.arch, routing="gather")
    _use(model, "auto", "auto")
    try:
        model.save_pretrained(tmp_path / "fused")
    finally:
        _use(model, "sdpa", "index")
    loaded = LlamaFusion.from_pretrained(tmp_path / "fused")
    assert (loaded.attention_backend, loaded.routing_backend) == ("auto", "auto")


def test_auto_picks_the_reference_paths_on_cpu(model):
    assert ModalityRouter(torch.tensor([[0, 1]]), "auto").routing == "index"
    batch = _batch(model)
    ref = _forward(model, batch, "sdpa", "index")
    out = _forward(model, batch, "auto", "auto")
    assert torch.equal(out.logits, ref.logits)
