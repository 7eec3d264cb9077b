"""``tokenizer_source`` / ``tokenizer:`` / ``chat_template``: vocabularies re-indexed as mergekit does.

Three tiny Llamas whose word-level tokenizers differ (extra words, added special tokens in different
orders, different vocabulary sizes) are merged by ``fusion-engine merge`` and by ``mergekit-yaml``
(in one child process); the tensors, the output vocabulary and ``vocab_size`` must agree.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from fusion_engine.cli import main as cli_main
from lora_fixtures import ROOT, scratch
from utils import load_dir, merge_alongside_mergekit

WORDS = ["<unk>", "<s>", "</s>"] + list("abcdefghij")
MODELS = {  # name: (extra words, added special tokens)
    "base": ([], []),
    "chat": (["k", "m"], ["<|im_start|>", "<|im_end|>"]),
    "code": (["m", "n", "o"], ["<|im_end|>", "<tool>"]),
}


def _tokenizer(extra, special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


def tiny_vocab_models() -> dict[str, str]:
    from transformers import LlamaForCausalLM

    from fusion_engine.demo import llama_config

    folder = os.path.join(ROOT, "vocab_models")
    paths = {name: os.path.join(folder, name) for name in MODELS}
    if all(os.path.isdir(p) for p in paths.values()):
        return paths
    for i, (name, (extra, special)) in enumerate(MODELS.items()):
        tok = _tokenizer(extra, special)
        torch.manual_seed(100 + i)
        model = LlamaForCausalLM(llama_config(num_layers=2, hidden=32, vocab=len(tok)))
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


CONFIGS = {
    "union": """\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {chat}
            parameters: {{weight: 0.7}}
          - model: {code}
            parameters: {{weight: 0.5}}
        tokenizer_source: union
        dtype: float32
        """,
    "tokens": """\
        merge_method: linear
        base_model: {base}
        models:
          - model: {base}
            parameters: {{weight: 0.2}}
          - model: {chat}
            parameters: {{weight: 0.5}}
          - model: {code}
            parameters: {{weight: 0.3}}
        tokenizer:
          source: union
          pad_to_multiple_of: 8
          tokens:
            <|im_end|>:
              source: {chat}
              force: true
            <tool>:
              source: {{kind: zero}}
            m:
              source: {{kind: model_token, model: {code}, token: "a"}}
            <extra>:
              source: {{kind: model_token, model: {chat}, token_id: 3}}
        dtype: float32
        """,
    "base": """\
        merge_method: linear
        base_model: {code}
        models:
          - model: {code}
            parameters: {{weight: 0.5}}
          - model: {chat}
            parameters: {{weight: 0.5}}
        tokenizer_source: base
        dtype: float32
        """,
    "model": """\
        merge_method: linear
        base_model: {base}
        models:
          - model: {base}
            parameters: {{weight: 0.5}}
          - model: {chat}
            parameters: {{weight: 0.5}}
        tokenizer_source: {chat}
        dtype: float32
        """,
}

@pytest.fixture(scope="module")
def merged():  # mergekit's import and tokenizer building take 10-40 s on a shared 2-core machine
    m = tiny_vocab_models()
    folder = scratch("vocab")
    paths = {}
    for name, text in CONFIGS.items():
        paths[name] = os.path.join(folder, f"{name}.yaml")
        with open(paths[name], "w") as f:
            f.write(textwrap.dedent(text).format(**m))
    outs = {n: (os.path.join(folder, f"{n}_ours"), os.path.join(folder, f"{n}_mergekit")) for n in paths}

    def ours(config, out):
        assert cli_main(["merge", config, out, "--quiet"]) == 0, config

    merge_alongside_mergekit([(paths[n], *outs[n]) for n in paths], ours)
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_vocabulary_and_tensors_as_mergekit(merged, name):
    from transformers import AutoTokenizer

    ours, theirs = merged[name]
    a, b = load_dir(ours), load_dir(theirs)
    ours_vocab, their_vocab = (AutoTokenizer.from_pretrained(p).get_vocab() for p in (ours, theirs))
    assert sorted(ours_vocab) == sorted(their_vocab)
    # mergekit appends the union's tokens in the order of a Python set of models (random per process; and
    # without a base_model it takes a random one as the base); we use the config's order: compare
    # vocabulary rows token by token
    tokens = sorted(their_vocab)
    ours_rows = torch.tensor([ours_vocab[t] for t in tokens])
    their_rows = torch.tensor([their_vocab[t] for t in tokens])
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].shape == b[key].shape, key
        x, y = a[key], b[key].to(a[key].dtype)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(x[len(tokens):], y[len(tokens):], atol=2e-6, rtol=2e-5, msg=key)  # padding
            x, y = x[ours_rows], y[their_rows]
        torch.testing.assert_close(x, y, atol=2e-6, rtol=2e-5, msg=key)
    with open(os.path.join(ours, "config.json")) as f, open(os.path.join(theirs, "config.json")) as g:
        assert json.load(f)["vocab_size"] == json.load(g)["vocab_size"]


def test_union_rules_by_hand():
    """Spot checks of the rules on the union merge: a token of one model keeps that model's row everywhere."""
    from transformers import AutoTokenizer

    m = tiny_vocab_models()
    folder = scratch("by_hand")
    config = os.path.join(folder, "union.yaml")
    with open(config, "w") as f:
        f.write(textwrap.dedent(CONFIGS["union"]).format(**m))
    assert cli_main(["merge", config, os.path.join(folder, "out"), "--quiet"]) == 0
    out = load_dir(os.path.join(folder, "out"))
    vocab = AutoTokenizer.from_pretrained(os.path.join(folder, "out")).get_vocab()
    code_vocab = AutoTokenizer.from_pretrained(m["code"]).get_vocab()
    base, chat, code = (load_dir(m[k])["model.embed_tokens.weight"] for k in ("base", "chat", "code"))
    # "o" only in code: every model's row is code's, so task arithmetic gives base + 0.7·0 + 0.5·0 = code's row
    row = code[code_vocab["o"]]
    torch.testing.assert_close(out["model.embed_tokens.weight"][vocab["o"]], row)
    # "a" in all three: ordinary task arithmetic
    want = base[0 + 3] + 0.7 * (chat[3] - base[3]) + 0.5 * (code[3] - base[3])
    torch.testing.assert_close(out["model.embed_tokens.weight"][vocab["a"]], want, atol=1e-6, rtol=1e-6)


def test_chat_template_and_errors(capsys):
    from transformers import AutoTokenizer

    m = tiny_vocab_models()
    folder = scratch("chat")
    cfg = os.path.join(folder, "c.yaml")
    with open(cfg, "w") as f:
        f.write(f"merge_method: linear\nmodels:\n  - model: {m['base']}\n  - model: {m['base']}\n"
                "parameters: {weight: 0.5}\nchat_template: chatml\n")
    out = os.path.join(folder, "out")
    assert cli_main(["merge", cfg, out, "--quiet"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\na b<|im_end|>\n<|im_start|>assistant\n"
    with open(cfg, "w") as f:
        f.write(f"merge_method: linear\nmodels:\n  - model: {m['base']}\n  - model: {m['chat']}\n"
                "parameters: {weight: 0.5}\n")
    assert cli_main(["merge", cfg, out + "2", "--quiet"]) == 2  # different vocabularies, no tokenizer source
    assert "tokenizer_source: union" in capsys.readouterr().err
    with open(cfg, "w") as f:
        f.write(f"merge_method: linear\nmodels:\n  - model: {m['base']}\n  - model: {m['chat']}\n"
                "parameters: {weight: 0.5}\ntokenizer:\n  source: union\n  tokens:\n    x:\n"
                f"      source: {{kind: model_token, model: {m['chat']}, token: nope}}\n")
    assert cli_main(["merge", cfg, out + "3", "--quiet"]) == 2
    assert "'nope'" in capsys.readouterr().err
