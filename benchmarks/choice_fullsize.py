"""The LLM's constrained choice at Llama 3's real vocabulary and width: logits for the last position only.

`python -m benchmarks.choice_fullsize`. A one-layer Llama with Llama-3-8B's vocabulary (128,256) and width (4096),
random bf16 weights, on a batch of 16 chats of 150 tokens, as `TransformersBackend.choose` runs it. The logits'
size depends only on the vocabulary, the batch and the length, not on the depth. tiny:llm (a 261-token vocabulary)
cannot show this. Not in the CPU suite: it builds 2 GiB of weights.
"""
from __future__ import annotations

import time

from benchmarks.common import write_result


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (16, 150))
    result = {}
    with torch.inference_mode():
        for name, kwargs in (("last_only", {"logits_to_keep": 1}), ("every_position", {})):
            t = time.perf_counter()
            logits = model(input_ids=ids, **kwargs).logits
            result[name] = {"shape": list(logits.shape), "logits_mib": round(logits.numel() * 2 / 2**20, 1),
                            "s": round(time.perf_counter() - t, 3), "last": logits[:, -1].float()}
    a, b = result["last_only"].pop("last"), result["every_position"].pop("last")
    result["same_pick"] = bool((a.argmax(-1) == b.argmax(-1)).all())
    result["max_abs_diff"] = float((a - b).abs().max())  # bf16 rounding of the same product
    print(result)
    print(f"wrote {write_result('choice_fullsize', result, params={'batch': 16, 'tokens': 150})}")


if __name__ == "__main__":
    main()
