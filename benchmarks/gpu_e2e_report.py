"""Whole merges on one GPU: ``fusion-engine merge --device cuda`` vs the I/O floor vs ``mergekit-yaml --cuda``.

One call (``benchmarks/gpu_e2e.sh``, itself called by ``benchmarks/gpu_suite.sh``) on the device machine:

* builds the synthetic 1.10 B-parameter bf16 Llama of :mod:`e2e_merge_report` (base + ``--models``
  fine-tunes, 1 GiB shards) on local disk;
* times the I/O floor (read every input byte once, write and fsync an output-sized file);
* for each method of ``--methods`` (default ties, dare_ties, slerp, della, model_stock: the ones with the most
  per-tensor work) times ``fusion-engine merge CONFIG OUT --device cuda`` and ``mergekit-yaml CONFIG OUT --cuda``
  on the same YAML, each its own process (wall, peak RSS = the child's ``ru_maxrss``), mergekit cut off after
  ``--mergekit-timeout`` seconds, and compares the two outputs;
* runs ``torchrun --nproc-per-node 2 -m fusion_engine merge ... --device cuda`` on the first method and checks
  that its output is byte-identical to the single-process one (both ranks share the GPU when only one exists).

Writes a markdown table to ``--out`` (and stdout); nothing is invented: a row that did not run says why.

    python benchmarks/gpu_e2e_report.py --out $OUT/RESULTS_gpu_e2e.md
    python benchmarks/gpu_e2e_report.py --size tiny --device cpu --methods ties --skip-mergekit   # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from e2e_merge_report import IO_FLOOR, compare, measure, weight_files, write_models  # noqa: E402

METHODS = ("ties", "dare_ties", "slerp", "della", "model_stock")
WEIGHTS = [0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]


def method_yaml(method: str, base: str, finetunes: list[str]) -> str:
    """The mergekit YAML both tools read: the method's usual parameters, bf16 output."""
    if method == "slerp":
        return "\n".join([f"merge_method: slerp", f"base_model: {base}", "models:", f"  - model: {base}",
                          f"  - model: {finetunes[0]}", "parameters:", "  t: 0.4", "dtype: bfloat16", ""])
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for i, ft in enumerate(finetunes):
        lines.append(f"  - model: {ft}")
        if method != "model_stock":
            lines += ["    parameters:", f"      weight: {WEIGHTS[i % len(WEIGHTS)]}", "      density: 0.5"]
            if method == "della":
                lines.append("      epsilon: 0.1")
    if method == "della":
        lines += ["parameters:", "  lambda: 1.0", "  normalize: true"]
    elif method != "model_stock":
        lines += ["parameters:", "  normalize: true"]
    lines += ["dtype: bfloat16", ""]
    return "\n".join(lines)


def timed(cmd: list[str], timeout: float | None = None) -> dict:
    """:func:`measure` with a wall-clock cut-off: {"error": ...} instead of a row when it did not finish."""
    try:
        if timeout is None:
            return measure(cmd)
        env = dict(os.environ)
        return measure(["timeout", str(int(timeout)), *cmd], env=env)
    except RuntimeError as exc:
        text = str(exc)
        return {"error": f"timed out after {int(timeout)} s" if timeout and "exited with 124" in text
                else text.splitlines()[0][:200]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b", help="1b (default), small or tiny (see e2e_merge_report.py)")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mergekit-timeout", type=float, default=60.0)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun ranks for the distributed row (0: skip)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the markdown here too")
    args = parser.parse_args(argv)

    lines: list[str] = []
    say = lines.append
    root = tempfile.mkdtemp(prefix="fe_gpu_e2e_", dir=args.workdir)
    try:
        start = time.perf_counter()
        paths, n_params = write_models(root, args.size, args.models)
        inputs = [f for p in paths for f in weight_files(p)]
        in_bytes = sum(os.path.getsize(f) for f in inputs)
        out_bytes = n_params * 2
        print(f"built {len(paths)} checkpoints ({in_bytes / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        floor = timed([sys.executable, "-c", IO_FLOOR, os.pathsep.join(inputs), os.path.join(root, "floor.bin"),
                       str(out_bytes)])
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        say(f"### Whole merges on {args.device} ({gpu}): {args.models} fine-tunes + base, synthetic Llama "
            f"{n_params / 1e9:.2f} B bf16\n")
        say(f"Machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}. Inputs {in_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, "
            f"page cache warm. I/O floor: {floor.get('wall_s', float('nan')):.2f} s.\n")
        say("| method | fusion-engine (s) | × I/O floor | RSS (GB) | mergekit --cuda (s) | RSS (GB) | "
            "× faster | max abs diff vs mergekit |")
        say("|---|---:|---:|---:|---:|---:|---:|---:|")
        dev = ["--device", args.device] if args.device != "cpu" else []
        first_out = first_config = None
        for method in args.methods.split(","):
            config = os.path.join(root, f"{method}.yml")
            with open(config, "w") as fh:
                fh.write(method_yaml(method, paths[0], paths[1:]))
            out_fe = os.path.join(root, f"fe_{method}")
            fe = timed([sys.executable, "-m", "fusion_engine", "merge", config, out_fe, "--quiet", *dev])
            mk = {"error": "skipped"}
            if not args.skip_mergekit and "error" not in fe:
                exe = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
                out_mk = os.path.join(root, f"mk_{method}")
                mk = timed([exe, config, out_mk, "--quiet", "--no-copy-tokenizer",
                            *(["--cuda"] if args.device.startswith("cuda") else [])], args.mergekit_timeout)
                if "error" not in mk:
                    mk["diff"] = f"{compare(out_fe, out_mk)[0]:.3g}"
                shutil.rmtree(out_mk, ignore_errors=True)
            if "error" in fe:
                say(f"| {method} | failed: {fe['error']} | | | | | | |")
                continue
            ratio = fe["wall_s"] / floor["wall_s"] if "wall_s" in floor else float("nan")
            mk_cells = (f"{mk['wall_s']:.1f} | {mk['peak_rss_kb'] / 1e6:.2f} | {mk['wall_s'] / fe['wall_s']:.1f}× | "
                        f"{mk['diff']}") if "error" not in mk else f"{mk['error']} | | |"
            say(f"| {method} | {fe['wall_s']:.2f} | {ratio:.2f} | {fe['peak_rss_kb'] / 1e6:.2f} | {mk_cells} |")
            if first_out is None:
                first_out, first_config = out_fe, config
            else:
                shutil.rmtree(out_fe, ignore_errors=True)
        if args.ranks > 1 and first_out is not None:
            out_dist = os.path.join(root, "fe_torchrun")
            run = timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc-per-node={args.ranks}", "-m", "fusion_engine", "merge", first_config, out_dist,
                         "--quiet", *dev])
            if "error" in run:
                say(f"\ntorchrun {args.ranks} ranks: failed: {run['error']}")
            else:
                worst, same = compare(first_out, out_dist)
                say(f"\ntorchrun --nproc-per-node {args.ranks} ({args.methods.split(',')[0]}): {run['wall_s']:.2f} s, "
                    f"peak RSS of the launcher's children {run['peak_rss_kb'] / 1e6:.2f} GB; output "
                    f"{'byte-identical to' if worst == 0 and same == 1 else 'DIFFERENT from'} the single process.")
        say(f"\nCommand: `python benchmarks/gpu_e2e_report.py --size {args.size} --models {args.models} "
            f"--device {args.device}`")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
