import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])  # left padding
kw = dict(attention_mask=(ids != 0).long(), max_new_tokens=8, do_sample=False, pad_token_id=0)

# Qwen2 with sliding-window and full attention layers in turn; layer 0 loses its attention branch
config = Qwen2Config(
    vocab_size=100,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=4,
    use_sliding_window=True,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"] * 2,
    pad_token_id=0,
)
model = Qwen2ForCausalLM(config).eval()
ds.sparsify_(model, {"layers": "fixed"})
ds.fix_gates_(model, {"model.layers.0.self_attn.o_proj.gate_out.gate": torch.tensor([False])})
small = ds.convert(model)
print("layer_types before:", model.config.layer_types)
print("layer_types after: ", small.config.layer_types)
print(
    "KV-cache entries:",
    [a.layer_idx if hasattr(a, "q_proj") else "removed" for a in (x.self_attn for x in small.model.layers)],
)
with torch.no_grad():
    same = torch.equal(small.generate(ids, **kw), model.generate(ids, **kw))
print("same greedy tokens as the gated model:", same)

# GPT-2 without any attention branch: the first removed layer keeps counting tokens in the cache
model = GPT2LMHeadModel(
    GPT2Config(vocab_size=100, n_embd=64, n_head=4, n_layer=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
).eval()
ds.sparsify_(model, {"layers": "fixed"})
ds.fix_gates_(model, {f"transformer.h.{i}.attn.c_proj.gate_out.gate": torch.tensor([False]) for i in range(3)})
small = ds.convert(model)
print(small.transformer.h[0].attn)
with torch.no_grad():
    out = small(ids[1:, :5], use_cache=True)  # a hand-written decoding step: positions come from the cache
    step = small(ids[1:, 5:6], cache=out.cache, use_cache=True)
    full = small(ids[1:, :6]).logits[:, -1]
    print(
        "cache length:",
        step.cache.get_seq_length(),
        "| max-abs difference to no cache:",
        f"{(step.logits[:, -1] - full).abs().max():.1e}",
    )
    print("same greedy tokens as the gated model:", torch.equal(small.generate(ids, **kw), model.generate(ids, **kw)))
