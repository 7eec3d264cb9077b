"""End-to-end checkpoint merge: ``fusion-engine merge`` vs ``mergekit-yaml``, same YAML, same machine, one run.

Builds a synthetic Llama-shaped bf16 checkpoint (default: hidden 2048, MLP 8192, 16 layers, vocab 32000,
GQA 32/8 heads, untied head: 1.10 B parameters, 2.2 GB) as a base plus ``--models`` fine-tunes
(base + small noise), in a temporary folder on disk, then times, one after the other, each as its own process:

* the I/O floor: read every input byte once (large ``readinto``) and write an output-sized file (fsync),
  nothing else — no merge can be faster than this on this disk;
* ``fusion-engine merge CONFIG OUT --quiet``;
* ``mergekit-yaml CONFIG OUT --quiet`` (its defaults: CPU, lazy loading from safetensors).

Every child runs in the temporary folder (cwd), outside the source tree, so it times the installed
package, as a user runs it. Wall time is the child's elapsed time; peak RSS is the child's ``ru_maxrss`` (measured by a fresh wrapper
process around each command, so one run never sees another's peak). Inputs were just written, so all three
read from the page cache alike (the machine has room for them). Both outputs are compared tensor by tensor.
Prints a markdown table for ``benchmarks/RESULTS.md``; the temp folder is removed afterwards.

    python benchmarks/e2e_merge_report.py                       # the 1B benchmark (~9 GB of inputs)
    python benchmarks/e2e_merge_report.py --size tiny           # a seconds-long smoke run
    python benchmarks/e2e_merge_report.py --device cuda         # fusion-engine on a GPU (mergekit: --cuda)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

SIZES = {  # hidden, intermediate, layers, vocab, heads, kv heads
    "1b": (2048, 8192, 16, 32000, 32, 8),
    "small": (512, 2048, 4, 8000, 8, 2),
    "tiny": (128, 512, 2, 1000, 4, 2),
}

MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - start
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

IO_FLOOR = r"""
import os, sys
files, out_path, out_bytes = sys.argv[1].split(os.pathsep), sys.argv[2], int(sys.argv[3])
buf = bytearray(64 << 20)
view = memoryview(buf)
for path in files:
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass
with open(out_path, "wb", buffering=0) as fh:
    left = out_bytes
    while left:
        left -= fh.write(view[: min(left, len(view))])
    os.fsync(fh.fileno())
os.remove(out_path)
"""


def llama_shapes(hidden, inter, layers, vocab, heads, kv_heads) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def write_models(root: str, size: str, n_models: int) -> tuple[list[str], int]:
    """base + n fine-tunes as sharded bf16 safetensors with a Llama config.json; returns paths, params."""
    from transformers import LlamaConfig

    from fusion_engine.io import ShardedWriter, plan_shards

    hidden, inter, layers, vocab, heads, kv_heads = SIZES[size]
    shapes = llama_shapes(hidden, inter, layers, vocab, heads, kv_heads)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                         torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    layout = plan_shards([(n, torch.bfloat16, s) for n, s in shapes.items()], 1 << 30)  # 1 GiB input shards
    paths = [os.path.join(root, name) for name in ["base"] + [f"ft{i}" for i in range(n_models)]]
    writers = []
    for path in paths:
        os.makedirs(path)
        config.save_pretrained(path)
        writers.append(ShardedWriter(path, layout))
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g) * 0.02 + (1.0 if "norm" in name else 0.0)
        writers[0].add(name, base.to(torch.bfloat16))
        for w in writers[1:]:
            delta = torch.randn(shape, generator=g) * 0.002
            w.add(name, (base + delta).to(torch.bfloat16))
    for w in writers:
        w.finish()
    return paths, sum(torch.Size(s).numel() for s in shapes.values())


def write_yaml(path: str, base: str, finetunes: list[str]) -> None:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    weights = [0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]
    for i, ft in enumerate(finetunes):
        lines += [f"  - model: {ft}", "    parameters:", f"      weight: {weights[i % len(weights)]}",
                  "      density: 0.5"]
    lines += ["parameters:", "  normalize: true", "dtype: bfloat16", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def measure(cmd: list[str], cwd: str, env=None) -> dict:
    """Run ``cmd`` in ``cwd`` (a temporary folder, outside the source tree: ``python -m fusion_engine``
    then imports the installed package, never a checkout's unbuilt ``fusion_engine/``)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"measuring {cmd[:4]} failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
        raise RuntimeError(f"{' '.join(cmd[:4])} exited with {result['rc']}: {rerun.stderr[-3000:]}")
    return result


def weight_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def compare(a: str, b: str) -> tuple[float, float]:
    """(max |a - b|, fraction of elements bit-equal) over every tensor of two checkpoints."""
    from fusion_engine.io import open_checkpoint

    worst, equal, total = 0.0, 0, 0
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        if sorted(ca.names()) != sorted(cb.names()):
            raise RuntimeError(f"{a} and {b} hold different tensor names")
        for name in ca.names():
            x, y = ca.read(name), cb.read(name)
            worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
            equal += int((x.view(torch.int16) == y.view(torch.int16)).sum()) if x.dtype == y.dtype else 0
            total += x.numel()
    return worst, equal / max(total, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--models", type=int, default=3, help="fine-tuned models besides the base (default 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    args = parser.parse_args(argv)

    root = os.path.abspath(tempfile.mkdtemp(prefix="fe_e2e_", dir=args.workdir))
    try:
        start = time.perf_counter()
        paths, n_params = write_models(root, args.size, args.models)
        build_s = time.perf_counter() - start
        config = os.path.join(root, "ties.yml")
        write_yaml(config, paths[0], paths[1:])
        inputs = [f for p in paths for f in weight_files(p)]
        in_bytes = sum(os.path.getsize(f) for f in inputs)
        out_bytes = n_params * 2
        print(f"built {len(paths)} checkpoints of {n_params / 1e9:.3f} B params ({in_bytes / 1e9:.2f} GB in all) "
              f"in {build_s:.0f} s under {root}", file=sys.stderr)

        rows = {}
        rows["I/O floor"] = measure([sys.executable, "-c", IO_FLOOR, os.pathsep.join(inputs),
                                     os.path.join(root, "floor.bin"), str(out_bytes)], cwd=root)
        fe_cmd = [sys.executable, "-m", "fusion_engine", "merge", config, os.path.join(root, "out_fe"), "--quiet"]
        if args.device != "cpu":
            fe_cmd += ["--device", args.device]
        rows["fusion-engine merge"] = measure(fe_cmd, cwd=root)
        if not args.skip_mergekit:
            mk = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
            mk_cmd = [mk, config, os.path.join(root, "out_mk"), "--quiet", "--no-copy-tokenizer"]
            if args.device.startswith("cuda"):
                mk_cmd += ["--cuda"]
            rows["mergekit-yaml"] = measure(mk_cmd, cwd=root)

        floor = rows["I/O floor"]["wall_s"]
        mk = rows.get("mergekit-yaml")
        print(f"\n### End-to-end TIES merge, {args.models} models + base, synthetic Llama "
              f"{n_params / 1e9:.2f} B bf16 ({args.size})\n")
        print(f"Machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}; "
              f"{time.strftime('%Y-%m-%d')}. Inputs {in_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, "
              f"page cache warm for all rows.\n")
        print("| run | wall (s) | peak RSS (GB) | GB/s moved | × wall vs mergekit | RSS vs mergekit | × I/O floor |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in rows.items():
            wall, rss = r["wall_s"], r["peak_rss_kb"] * 1024 / 1e9
            speed = f"{mk['wall_s'] / wall:.1f}× faster" if mk and name != "mergekit-yaml" else "—"
            mem = f"{rss / (mk['peak_rss_kb'] * 1024 / 1e9):.2f}×" if mk else "—"
            print(f"| {name} | {wall:.1f} | {rss:.2f} | {(in_bytes + out_bytes) / wall / 1e9:.2f} | {speed} | "
                  f"{mem} | {wall / floor:.2f} |")
        if mk:
            worst, same = compare(os.path.join(root, "out_fe"), os.path.join(root, "out_mk"))
            print(f"\nfusion-engine vs mergekit output: max |Δ| {worst:.3g}, {same * 100:.2f}% of elements bit-equal.")
        print(f"\nCommand: `python benchmarks/e2e_merge_report.py --size {args.size} --models {args.models}"
              f"{' --device ' + args.device if args.device != 'cpu' else ''}`")
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
