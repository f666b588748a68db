"""An lm-evaluation-harness model for LlamaFusion: `megafusion` in lm-eval's registry.

Text benchmarks (HellaSwag, PIQA, SIQA, WinoGrande, ...) only ever see the text path, so a model trained with
eta_text = 0 scores exactly what its base LM scores. Needs the `eval` extra (`pip install 'megafusion[eval]'`);
importing this module registers the model:

    import lm_eval, megafusion.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="megafusion", model_args="pretrained=runs/fused", tasks=["hellaswag"])

or `megafusion eval --model runs/fused ... --lm-eval-tasks hellaswag,piqa,siqa,winogrande`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.text import generate_tokens
from megafusion.inference.tokens import stop_token_ids, tokenizer_for
from megafusion.model import LlamaFusion

DEFAULT_MAX_GEN_TOKS = 256


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaFusion:
    """A saved LlamaFusion directory, or a plain Llama checkpoint (scores the base through the same code)."""
    path = Path(path)
    if (path / "fusion_config.json").is_file():
        return LlamaFusion.from_pretrained(path, dtype=dtype).eval()
    return LlamaFusion.from_llama(path, dtype=dtype).eval()


@register_model("megafusion")
class MegaFusionLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size: int | str | None = 8,
                 max_length: int | None = None, dtype: str = "float32", device: str = "cpu",
                 max_batch_size: int | None = None, **_: object) -> None:
        super().__init__()
        self.model = load_model(pretrained, getattr(torch, dtype)).to(device)
        base = tokenizer or self.model.base_path or pretrained
        # The training tokenizer (checked against the model's document_prefix); the text path never sees images,
        # so the model's diffusion settings play no part here.
        self.tok = tokenizer_for(self.model, base)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else 8  # "auto" is not supported
        self.max_length = int(max_length or self.model.arch.max_position_embeddings)
        self.device_name = device
        # An empty context is scored after this token, as lm-eval's HF model does (BOS, else EOS).
        prefix = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        if prefix is None:
            raise ValueError(f"{base}: the tokenizer has neither BOS nor EOS to condition an empty context on")
        self.prefix_token_id = int(prefix)
        self.stop_ids = stop_token_ids(self.model, self.tok)

    # ------------------------------------------------------------------ scoring
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation's first token (lm-eval's convention).
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        ctx, cont = (ctx, whole[len(ctx):]) if whole[: len(ctx)] == ctx else (ctx, self.tok.encode(continuation))
        if not ctx:
            ctx = [self.prefix_token_id]
        return ctx, cont

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str, progress: bool = True
               ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per (context ids, continuation ids).
        Rows are right-padded in length-sorted batches: causal attention never lets a real token see padding."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=not progress):
            batch = order[start : start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in batch]
            width = max(len(s) for s in seqs) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s) - 1] = torch.tensor(s[:-1])
            logp = torch.log_softmax(self.model(input_ids=ids.to(self.device_name)).logits.double(), dim=-1).cpu()
            for r, (i, s) in enumerate(zip(batch, seqs, strict=True)):
                n = min(len(pairs[i][1]), len(s) - 1)  # a continuation longer than the window is cut
                target = torch.tensor(s[-n:])
                rows = logp[r, len(s) - 1 - n : len(s) - 1]
                total = float(rows.gather(1, target[:, None]).sum())
                results[i] = (total, bool((rows.argmax(-1) == target).all()))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._score(pairs, "loglikelihood")
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(score for score, _ in self._score(windows, "windows", progress=False))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc="generate_until"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0) if kwargs.get("do_sample") else 0.0
            ids = self.tok.encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - max_new):]
            new = generate_tokens(self.model, [[ids]], SamplingConfig(max_new, temperature), self.stop_ids)[0]
            text = self.tok.decode([t for t in new if t not in self.stop_ids])
            for stop in until:  # generation ran past the first stop sequence at most to max_gen_toks
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out
