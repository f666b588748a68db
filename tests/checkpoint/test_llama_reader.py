"""Loading HF Llama checkpoints: sharded safetensors, and clear errors for everything else."""

import json

import pytest
import torch
from safetensors.torch import save_file

from megafusion.checkpoint.llama_reader import CheckpointError
from megafusion.model import LlamaFusion, UnsupportedCheckpointError
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama


def _load(path, **kw):
    return LlamaFusion.from_llama(path, image=TINY_IMAGE, unet=TINY_UNET, **kw)


def test_sharded_checkpoint_loads_with_identical_logits(tmp_path):
    ref = save_tiny_llama(tmp_path / "one", "gqa-untied")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "sharded")(input_ids=ids).logits, ref(ids).logits,
                                   atol=1e-5, rtol=0)


def test_missing_shard_names_the_file(tmp_path):
    ref = save_tiny_llama(tmp_path / "one", "gqa-untied")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "sharded" / victim).unlink()
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        _load(tmp_path / "sharded")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        _load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nope")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"weights\.txt: is a file but not a \.gguf file"):
        _load(tmp_path / "weights.txt")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    save_tiny_llama(tmp_path, "gqa-untied")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        _load(tmp_path)


def test_corrupt_safetensors_names_the_file(tmp_path):
    save_tiny_llama(tmp_path, "gqa-untied")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        _load(tmp_path)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
    ],
)
def test_unsupported_architecture(tmp_path, changes, message):
    save_tiny_llama(tmp_path, "gqa-untied")
    _edit_config(tmp_path, **changes)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        _load(tmp_path)


def test_config_that_does_not_match_the_weights(tmp_path):
    save_tiny_llama(tmp_path, "gqa-untied")
    _edit_config(tmp_path, intermediate_size=48)
    with pytest.raises(ValueError, match=r"safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        _load(tmp_path)
    _edit_config(tmp_path, intermediate_size=64, num_hidden_layers=1)
    with pytest.raises(ValueError, match="holds tensors the config does not describe"):
        _load(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.2\."):
        _load(tmp_path)


def test_tied_checkpoint_with_redundant_head_loads(tmp_path):
    ref = save_tiny_llama(tmp_path, "mha-tied")
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    assert _load(tmp_path).lm_head is None
