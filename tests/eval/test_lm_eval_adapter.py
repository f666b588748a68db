"""The lm-evaluation-harness adapter: its three methods against transformers on the tiny Llama, and a run of a
small local task through lm-eval itself (no network: a YAML task over a local jsonl)."""

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from megafusion.checkpoint.builtin_bases import resolve_base  # noqa: E402
from megafusion.eval.lm_eval_adapter import MegaFusionLM  # noqa: E402
from megafusion.eval.text import load_base_lm  # noqa: E402
from megafusion.model import LlamaFusion  # noqa: E402


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "model"
    LlamaFusion.from_llama(resolve_base("builtin:tiny-llama"), separation="deep").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(fused_dir):
    return MegaFusionLM(pretrained=str(fused_dir), batch_size=3)


@pytest.fixture(scope="module")
def base_lm():
    return load_base_lm(resolve_base("builtin:tiny-llama"))


def _req(*args):
    return SimpleNamespace(args=args)


def _hf_logprob(base_lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(base_lm(input_ids=ids).logits[0].double(), -1)
    rows = logp[len(ctx) - 1 : -1]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihood_matches_transformers(lm, base_lm):
    pairs = [("The cat sat on the", " mat"), ("Question: 2+2=", " 4"), ("", "hello world"), ("abc ", "def")]
    got = lm.loglikelihood([_req(*p) for p in pairs])
    for (ctx, cont), (logprob, greedy) in zip(pairs, got, strict=True):
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        want, want_greedy = _hf_logprob(base_lm, ctx_ids, cont_ids)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # A trailing space in the context moves to the continuation; an empty context is scored after BOS.
    assert lm._encode_pair("abc ", "def")[1] == lm.tok.encode("abc def")[len(lm.tok.encode("abc")):]
    assert lm._encode_pair("", "x")[0] == [lm.tok.bos_id]


def test_loglikelihood_rolling_matches_transformers(lm, base_lm):
    text = "Rivers shape the land they cross, and towns grow beside them."
    ids = lm.tok.encode(text)
    (whole,) = lm.loglikelihood_rolling([_req(text)])
    assert whole == pytest.approx(_hf_logprob(base_lm, [lm.tok.bos_id], ids)[0], abs=1e-4)
    # With a short window every token is still predicted once, each with up to max_length tokens of context.
    lm.max_length = 16
    try:
        (windowed,) = lm.loglikelihood_rolling([_req(text)])
    finally:
        lm.max_length = 4096
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-6)


def test_generate_until_matches_transformers_greedy(lm, base_lm):
    context = "Once upon a time"
    (out,) = lm.generate_until([_req(context, {"until": [], "max_gen_toks": 8})])
    ids = lm.tok.encode(context)
    with torch.no_grad():
        ref = base_lm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long), eos_token_id=257,
                               pad_token_id=257)
    new = [t for t in ref[0, len(ids):].tolist() if t not in lm.stop_ids]
    assert out == lm.tok.decode(new)
    stop = out[len(out) // 2 :][:2] if len(out) > 3 else None
    if stop:
        (cut,) = lm.generate_until([_req(context, {"until": [stop], "max_gen_toks": 8})])
        assert cut == out[: out.index(stop)]


def test_tokenizer_must_start_documents_like_the_models_training(tmp_path):
    model = LlamaFusion.from_llama(resolve_base("builtin:tiny-llama"), separation="deep")
    model.document_prefix = [7]
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"starts documents with \[256\].*documents starting with \[7\]"):
        MegaFusionLM(pretrained=str(tmp_path / "m"))


@pytest.mark.slow
def test_local_task_runs_through_lm_eval(fused_dir, tmp_path, monkeypatch):
    from megafusion.eval.cli import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"question": "Which is a colour?", "choices": ["red", "seven"], "answer": 0},
            {"question": "Which is a number?", "choices": ["blue", "three"], "answer": 1},
            {"question": "Which is an animal?", "choices": ["cat", "chair"], "answer": 0}]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_task.yaml").write_text(
        "task: megafusion_tiny_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = run_lm_eval(str(fused_dir), ["megafusion_tiny_local"], str(tmp_path), None)
    acc = results["megafusion_tiny_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0
