"""``fusion-engine demo``: a whole checkpoint merge on an embedded default, start to finish.

It builds a small seeded Llama (a transformers ``LlamaConfig``, random weights, a character-level
tokenizer, a few MB) and three "fine-tuned" variants of it (the base plus small seeded task
vectors), writes a mergekit YAML that TIES-merges them with a density gradient over the layers
and a filtered weight, runs it through ``fusion-engine merge`` (:func:`fusion_engine.cli.merge`)
exactly as for real checkpoints, then loads the result with ``transformers`` and generates a few
tokens.

The builders are public so tests and benchmarks make the same tiny checkpoints.
"""

from __future__ import annotations

import os
import string
import tempfile
import time
from collections.abc import Callable

import torch

from .errors import ConfigError

DEMO_CONFIG = """\
# TIES-merge three fine-tuned variants of a tiny Llama into their base (mergekit syntax).
merge_method: ties
base_model: {base}
models:
  - model: {m0}
    parameters:
      weight: 1.0
      density: [0.3, 0.7]        # a gradient: 0.3 at the first layer, 0.7 at the last
  - model: {m1}
    parameters:
      weight:
        - filter: mlp            # tensors whose name contains "mlp"
          value: 0.8
        - value: 0.5             # every other tensor
      density: 0.5
  - model: {m2}
    parameters:
      weight: 0.5
      density: 0.5
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
"""


def llama_config(*, num_layers: int = 4, hidden: int = 64, vocab: int = 128, heads: int = 4, kv_heads: int = 2,
                 tie_word_embeddings: bool = False):
    """A tiny ``LlamaConfig`` (intermediate size 2·hidden, 128 positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=128, tie_word_embeddings=tie_word_embeddings,
                       bos_token_id=1, eos_token_id=2)


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (98 ids: <unk>, <s>, </s>, then characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable:
        if c not in "\t\n\r\x0b\x0c":
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_llamas(folder: str, *, n_models: int = 3, num_layers: int = 4, hidden: int = 64, vocab: int = 128,
                      seed: int = 0, delta_scale: float = 0.02, tie_word_embeddings: bool = False,
                      tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Save a seeded tiny Llama base and ``n_models`` variants (base + N(0, delta_scale²) deltas) under
    ``folder`` with ``save_pretrained`` (safetensors). Returns ``{"base": path, "model_0": path, ...}``."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(num_layers=num_layers, hidden=hidden, vocab=vocab, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tok = char_tokenizer() if tokenizer else None
    g = torch.Generator().manual_seed(seed + 1)
    paths = {}
    for i in range(n_models + 1):
        key = "base" if i == 0 else f"model_{i - 1}"
        path = os.path.join(folder, key)
        if i > 0:
            state = {k: v + (delta_scale * torch.randn(v.shape, generator=g)).to(v.dtype)
                     for k, v in base_state.items()}
            model.load_state_dict(state)
        model.save_pretrained(path, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(path)
        paths[key] = path
    return paths


def write_demo_config(folder: str, paths: dict[str, str]) -> str:
    """Write the demo's mergekit YAML for ``paths`` (from :func:`build_tiny_llamas`); returns its path."""
    path = os.path.join(folder, "merge.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(DEMO_CONFIG.format(base=paths["base"], m0=paths["model_0"], m1=paths["model_1"], m2=paths["model_2"]))
    return path


def generate(model_dir: str, prompt: str = "Hello", max_new_tokens: int = 12) -> tuple[list[int], str, torch.Tensor]:
    """Load ``model_dir`` with transformers and greedily generate ``max_new_tokens`` tokens.

    Returns the new token ids, the decoded text (ids past the tokenizer's vocabulary decode to
    nothing) and the logits of the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new_ids = out[0, ids.shape[1]:].tolist()
    return new_ids, tok.decode(out[0], skip_special_tokens=True), logits


def run_demo(merge: Callable[[str, str], int], workdir: str | None = None, *, quiet: bool = False) -> int:
    """Build, merge, load and generate. ``merge(config_path, out_dir)`` is the CLI's merge command
    (:func:`fusion_engine.cli.merge`, passed in by the CLI). Returns the exit code of the merge.

    Without transformers (an optional dependency: the ``demo`` extra) this raises a ConfigError
    saying how to install it (the CLI exits 2)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError('fusion-engine demo needs transformers, which is not installed: '
                          'pip install "fusion_engine[demo]" (or pip install transformers)') from None

    transformers.utils.logging.disable_progress_bar()  # the merge's own progress bar is enough

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="fusion_engine_demo_") as tmp:
        folder = workdir or tmp
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        paths = build_tiny_llamas(os.path.join(folder, "models"))
        size = sum(os.path.getsize(os.path.join(p, "model.safetensors")) for p in paths.values())
        say(f"built a tiny seeded Llama base and 3 fine-tuned variants in {folder}/models "
            f"({size / 2**20:.1f} MB, {time.perf_counter() - start:.1f} s)")
        config = write_demo_config(folder, paths)
        out_dir = os.path.join(folder, "merged")
        say(f"merging with {config}:\n")
        say("    " + open(config, encoding="utf-8").read().replace("\n", "\n    "))
        code = merge(config, out_dir)
        if code != 0:
            return code
        new_ids, text, logits = generate(out_dir)
        if not torch.isfinite(logits).all():
            say("the merged model's logits are not finite")
            return 1
        say(f"loaded {out_dir} with transformers; greedy generation from 'Hello': token ids {new_ids} -> {text!r}")
        say("(random weights, so the text is noise; the point is that the merged checkpoint loads and runs)")
    return 0
