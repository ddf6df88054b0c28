"""Builds the HF parity fixtures in tests/fixtures/hf/<family>/ with the real `transformers`.

One tiny random model per family, saved with `save_pretrained(safe_serialization=True)`, plus
reference.npz: fixed token ids, the final-norm hidden states and the logits (float32). Needs torch
and transformers, which the tests do not (the CPU wheel is enough):

  python3.11 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [FAMILY ...]

Without FAMILY names it rebuilds every fixture.
"""

import argparse
import pathlib
import shutil

import numpy as np
import torch
import transformers

VOCAB, LENGTH = 128, 16
IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=None)
SMALL = dict(IDS, vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128)

# family -> (config class, kwargs, save_pretrained kwargs). What each model exercises:
FAMILIES = {
    # learned positions, LayerNorm, biased Conv1D projections, tanh-GELU, tied head
    "gpt2": (transformers.GPT2Config,
             dict(IDS, vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  tie_word_embeddings=True), {}),
    # partial rotary (4 of 16 dims), parallel residual, fused per-head qkv, untied
    "gpt_neox": (transformers.GPTNeoXConfig,
                 dict(SMALL, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                      rotary_pct=0.25, rotary_emb_base=10_000, use_parallel_residual=True,
                      tie_word_embeddings=False), {}),
    # GQA, llama3 RoPE scaling that moves frequencies at short range, sharded safetensors
    "llama": (transformers.LlamaConfig,
              dict(SMALL, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, tie_word_embeddings=False,
                   rope_parameters=dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64)),
              dict(max_shard_size="40KB")),
    # post-sublayer RMSNorm, QK-norm over the full projections, GQA
    "olmo2": (transformers.Olmo2Config,
              dict(SMALL, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, tie_word_embeddings=False,
                   rope_parameters=dict(rope_type="default", rope_theta=10_000.0)), {}),
    # per-head QK-norm, head_dim 16 != 32 / 4, GQA, tied head
    "qwen3": (transformers.Qwen3Config,
              dict(SMALL, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=64, tie_word_embeddings=True,
                   rope_parameters=dict(rope_type="default", rope_theta=10_000.0)), {}),
    # odd rotary dim: int(12 * 0.25) = 3 gives 2 frequencies (exponents 0/3, 2/3) on 4 channels
    "gpt_neox_odd_rotary": (transformers.GPTNeoXConfig,
                            dict(SMALL, num_hidden_layers=1, hidden_size=24, num_attention_heads=2,
                                 intermediate_size=48, rotary_pct=0.25, rotary_emb_base=10_000,
                                 use_parallel_residual=True, tie_word_embeddings=False), {}),
}


def randomize(model: torch.nn.Module, seed: int):
  """Replaces HF's near-zero init so every tensor, norms and biases included, matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      mean = 1.0 if p.ndim == 1 and not name.endswith("bias") else 0.0
      std = 0.2 if p.ndim == 1 else 0.15
      p.copy_(mean + std * torch.randn(p.shape, generator=gen))


def build(family: str, out: pathlib.Path, seed: int):
  config_cls, kwargs, save_kwargs = FAMILIES[family]
  config = config_cls(**kwargs, attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  randomize(model, seed)
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (2, LENGTH))
  with torch.no_grad():
    ids = torch.tensor(tokens)
    outputs = model(ids, output_hidden_states=True)
    base = getattr(model, model.base_model_prefix)(ids).last_hidden_state
  hidden, logits = outputs.hidden_states[-1], outputs.logits
  # The last hidden state must be the final-norm one the head consumes.
  torch.testing.assert_close(hidden, base, rtol=0, atol=0)
  torch.testing.assert_close(logits, hidden @ model.get_output_embeddings().weight.T)
  if out.exists():
    shutil.rmtree(out)
  model.save_pretrained(out, safe_serialization=True, **save_kwargs)
  np.savez_compressed(out / "reference.npz", tokens=tokens.astype(np.int32),
                      hidden=hidden.numpy().astype(np.float32),
                      logits=logits.numpy().astype(np.float32),
                      transformers_version=np.array(transformers.__version__),
                      torch_version=np.array(torch.__version__))
  size = sum(f.stat().st_size for f in out.iterdir())
  print(f"{family:9s} {size / 1024:6.1f} KiB  {sorted(f.name for f in out.iterdir())}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=pathlib.Path(__file__).parents[1] / "tests/fixtures/hf",
                      type=pathlib.Path)
  parser.add_argument("families", nargs="*", metavar="FAMILY",
                      help=f"fixtures to rebuild (default: all of {', '.join(FAMILIES)})")
  args = parser.parse_args()
  if unknown := set(args.families) - set(FAMILIES):
    parser.error(f"unknown FAMILY {sorted(unknown)}; known: {list(FAMILIES)}")
  for seed, family in enumerate(FAMILIES):  # each fixture keeps its seed
    if family in (args.families or FAMILIES):
      build(family, args.out / family, seed)
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
  main()
