"""End-to-end greedy decoding, batch 1, on the packaged model: dense vs sparse.

Measured side by side in one run (same prompt, same number of tokens, repeats interleaved):
  - dense:          no hooks, plain nn.Linear
  - masked:         TEAL hooks zero inputs, nn.Linear (MKL) still multiplies every column
  - sparse:         TEAL hooks + the "auto" kernel (rows grouped, split-K between threads)
  - ordered:        TEAL hooks + the ordered kernel (each output summed over kept inputs in
                    order; the default of enable_sparse_decode)
  - ordered_dense:  the same ordered sum over every input, zeros included (masked dense)

Token identity: ``ordered`` must emit exactly the tokens (and logits, bit for bit) of
``ordered_dense``, the masked-dense reference computed in the same order. ``sparse`` and
``masked`` agree only to float rounding; a threshold sparsifier turns
one rounding difference at an input sitting on the threshold into a different mask, and the
greedy sequences can part after a few tokens: the first position where they differ is
reported.

    python benchmarks/perf/sparse_decode.py [--sparsity 0.5 0.7 --new-tokens 64 --repeats 3]

``--device cuda`` decodes greedily on a randomly initialised model of a real shape
(``benchmarks/scale.py``'s ``SHAPES``, default Llama-3-8B, bf16) with TEAL thresholds
calibrated on random tokens, through the CUDA backend of ``spon_exp::sparse_linear`` (the
Triton GEMV), against dense, measured side by side in one run:

    python benchmarks/perf/sparse_decode.py --device cuda      # -> benchmarks/results/sparse_decode_cuda.json

  - dense:           no sparsity, nn.Linear (cuBLAS)
  - masked:          TEAL hooks zero inputs, nn.Linear still multiplies every column
  - sparse:          TEAL hooks + the Triton GEMV skipping zeroed inputs (``ordered``)
  - sparse_no_skip:  the same kernel reading every row (``ordered_dense``): bit-identical
                     tokens and logits to ``sparse`` are checked
Every decode step after the prefill is one call of the model's forward on a static KV
cache, run eagerly (all four variants) and, for dense and sparse, as a CUDA graph
(``torch.compile(backend="cudagraphs")``: dynamo's graph of the same ops replayed without
launch overhead, which helps dense and sparse alike; ``--compile-backend inductor`` uses
inductor's ``reduce-overhead`` instead, which also fuses the elementwise work on both
sides). Variants switch by decode mode and the sparsifier's switch, so the transposed
weights are built once. Tokens/s count the ``--new-tokens`` decode steps of every sequence
in the batch; the prefill is not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from spon_exp.kernels.decode import disable_sparse_decode, enable_sparse_decode
from spon_exp.kernels.sparse_matvec import kernel_info
from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier

OUT = Path(__file__).resolve().parents[1] / "results" / "sparse_decode.json"


CUDA_VARIANTS = {  # name: (sparsifier on, decode mode)
    "dense": (False, "dense"),
    "masked": (True, "dense"),
    "sparse": (True, "ordered"),
    "sparse_no_skip": (True, "ordered_dense"),
}
GRAPH_VARIANTS = ("dense", "sparse")  # each graph is one compile of the whole model: only the two compared


def identical(a: tuple, b: tuple) -> bool:
    """Same tokens and bit-identical logits at every step."""
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _scale_module():
    """benchmarks/scale.py (its SHAPES and build_model), loaded from its file."""
    spec = importlib.util.spec_from_file_location("spon_exp_bench_scale", Path(__file__).resolve().parents[1] / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def switch(sparsifier, variant: str) -> None:
    """Sparsifier on/off and decode mode of one variant (no weights are copied)."""
    on, mode = CUDA_VARIANTS[variant]
    sparsifier.enabled = on
    enable_sparse_decode(sparsifier, mode=mode)


class GreedyDecoder:
    """Greedy decoding of one prompt batch on a static KV cache: an untimed eager prefill,
    then ``new_tokens`` timed steps through ``step`` (the eager forward or a compiled graph)."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int):
        from transformers import StaticCache

        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.cuda = prompt.device.type == "cuda"
        self.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 1)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, step, graph: bool) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """Tokens ``[batch, new_tokens]``, each step's logits (float32) and tokens/s."""
        self.cache.reset()
        tokens, logits = [], []
        with torch.no_grad():
            token = self.model(self.prompt, cache=self.cache, use_cache=True).logits[:, -1:].argmax(-1)
            self.sync()
            t0 = time.perf_counter()
            for _ in range(self.new_tokens):
                if graph and self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                out = step(input_ids=token, cache=self.cache, use_cache=True).logits[:, -1]
                logits.append(out.float().clone())  # a graph's output buffer is reused
                token = out.argmax(-1, keepdim=True)
                tokens.append(token)
            self.sync()
            elapsed = time.perf_counter() - t0
        return torch.cat(tokens, 1), logits, self.prompt.shape[0] * self.new_tokens / elapsed


def agreement(a: tuple, b: tuple, name: str) -> dict:
    """First decode step where the tokens of ``a`` and ``b`` differ (None: never) and the
    largest logit difference at the first step."""
    diff = (a[0] != b[0]).any(0).nonzero()
    return {f"sparse_vs_{name}_first_different_token": None if len(diff) == 0 else int(diff[0]),
            f"sparse_vs_{name}_first_step_max_abs_logit_diff": float((a[1][0] - b[1][0]).abs().max())}


def decode_side_by_side(model, sparsifier, decoder: GreedyDecoder, steps: dict, repeats: int) -> tuple[dict, dict]:
    """Every (execution, variant) decoded ``repeats`` times, interleaved: tokens/s and the last outputs."""
    # eager: every variant; as a graph (one compile of the whole model each): dense and sparse
    runs = [(e, v) for e in steps for v in (CUDA_VARIANTS if e == "eager" else GRAPH_VARIANTS)]
    for execution, variant in runs:  # warm-up: compiles every graph once
        switch(sparsifier, variant)
        decoder.run(steps[execution], graph=execution == "graph")
    speeds: dict = {run: [] for run in runs}
    outputs: dict = {}
    for _ in range(repeats):  # interleaved, so clock or load drift hits all alike
        for execution, variant in runs:
            switch(sparsifier, variant)
            *outputs[(execution, variant)], tokens_per_s = decoder.run(steps[execution], graph=execution == "graph")
            speeds[(execution, variant)].append(tokens_per_s)
    switch(sparsifier, "sparse")
    return speeds, outputs


def run_random_model(args) -> dict:
    """Greedy decoding of a random model of a real shape on ``args.device`` (see the docstring)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model, _ = _scale_module().build_model(args.shape, args.layers, args.device, getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.calib_sequences, args.calib_len), generator=gen).to(device)
    # one compiled graph per variant (decode mode, sparsifier switch) and batch size
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    steps = {"eager": model.forward}
    if args.compile_backend == "cudagraphs":
        steps["graph"] = torch.compile(model.forward, backend="cudagraphs", fullgraph=True)
    elif args.compile_backend == "inductor":
        steps["graph"] = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    results = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
               "torch": torch.__version__, "cuda": torch.version.cuda, "shape": args.shape,
               "layers": model.config.num_hidden_layers, "dtype": args.dtype, "new_tokens": args.new_tokens,
               "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "compile_backend": args.compile_backend,
               "runs": []}
    for s in args.sparsity:
        sp = build_sparsifier("teal", sparsity=s).attach(model)
        t0 = time.perf_counter()
        sp.calibrate(model, calib.split(1))
        calibrate_s = time.perf_counter() - t0
        enable_sparse_decode(sp, mode="dense")
        for batch in args.batch:
            decoder = GreedyDecoder(model, torch.randint(0, vocab, (batch, args.prompt_tokens), generator=gen).to(device),
                                    args.new_tokens)
            # measured first: measuring changes state the hooks read, which a compiled graph guards on
            switch(sp, "sparse")
            with sp.measuring():
                decoder.run(model.forward, graph=False)
            measured = sp.measured_sparsity()["model"]
            speeds, outputs = decode_side_by_side(model, sp, decoder, steps, args.repeats)
            for execution in steps:
                variants = [v for e, v in speeds if e == execution]
                med = {v: statistics.median(speeds[(execution, v)]) for v in variants}
                row = {"sparsity": s, "batch": batch, "execution": execution, "calibrate_s": calibrate_s,
                       "measured_sparsity_decode": measured, "tokens_per_s": med,
                       "all_tokens_per_s": {v: speeds[(execution, v)] for v in variants},
                       "sparse_over_dense": med["sparse"] / med["dense"]}
                sparse = outputs[(execution, "sparse")]
                if execution == "eager":
                    row["sparse_over_masked"] = med["sparse"] / med["masked"]
                    row["sparse_identical_to_no_skip"] = identical(sparse, outputs[("eager", "sparse_no_skip")])
                    row.update(agreement(sparse, outputs[("eager", "masked")], "masked"))
                else:  # dynamo's graph of the same ops: equal to eager up to rounding
                    row.update(agreement(sparse, outputs[("eager", "sparse")], "eager"))
                results["runs"].append(row)
                checks = {k: v for k, v in row.items() if k.startswith(("sparse_identical", "sparse_vs_"))}
                print(f"sparsity {s:.2f} batch {batch} {execution:>5}: "
                      + ", ".join(f"{v} {med[v]:.1f}" for v in variants)
                      + f" tok/s; sparse/dense {row['sparse_over_dense']:.2f}x; measured sparsity {measured:.3f}; {checks}")
        disable_sparse_decode(sp)
        sp.detach()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the packaged model (the variants above); cuda: a random model of --shape")
    parser.add_argument("--sparsity", type=float, nargs="+", default=None,
                        help="default 0.5 0.7 on the CPU, 0.5 on CUDA")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", default=None,
                        help="random model of this scale.py shape (default llama3_8b on CUDA; on the CPU: "
                             "'small' runs the CUDA benchmark's code in seconds)")
    parser.add_argument("--layers", type=int, default=None, help="cut the shape to this many layers")
    parser.add_argument("--dtype", default=None, help="random model dtype (default bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="random model: sequences decoded together (1-8 sparse)")
    parser.add_argument("--calib-sequences", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--compile-backend", choices=("cudagraphs", "inductor", "none"), default=None,
                        help="random model: how the decode step is also run as a graph (default cudagraphs on CUDA, "
                             "none on the CPU)")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/sparse_decode[_cuda].json)")
    args = parser.parse_args()

    if args.device == "cuda" or args.shape is not None:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
        cuda = args.device == "cuda"
        args.shape = args.shape or "llama3_8b"
        args.sparsity = args.sparsity or [0.5]
        args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
        args.compile_backend = args.compile_backend or ("cudagraphs" if cuda else "none")
        if args.compile_backend != "none" and not cuda:
            parser.error("--compile-backend needs --device cuda (CUDA graphs)")
        results = run_random_model(args)
        out = Path(args.out or OUT.with_name(f"sparse_decode_{args.device}_{args.shape}.json" if not cuda
                                             else "sparse_decode_cuda.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"written {out}")
        return
    args.sparsity = args.sparsity or [0.5, 0.7]
    args.out = args.out or str(OUT)
    from spon_exp.data.corpora import token_blocks  # the packaged corpus: only this path reads text

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    calib = token_blocks(tok, "wikipedia", "calibration", 256, 8)
    prompt = token_blocks(tok, "wikipedia", "evaluation", args.prompt_tokens, 1)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)

    def decode():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **gen)
        return out, args.new_tokens / (time.perf_counter() - t0)

    def first_difference(a, b):
        diff = (a.sequences[0] != b.sequences[0]).nonzero()
        return None if len(diff) == 0 else int(diff[0]) - prompt.shape[1]

    variants = ("dense", "masked", "sparse", "ordered", "ordered_dense")
    results = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
               "kernel": kernel_info(), "new_tokens": args.new_tokens, "runs": []}
    decode()  # warm-up
    print(f"{'sparsity':>8}" + "".join(f"{v + ' tok/s':>21}" for v in variants)
          + f"{'sparse/dense':>14}{'ordered/dense':>15}{'ordered==ref':>14}{'sparse vs masked':>18}")
    for s in args.sparsity:
        sp = build_sparsifier("teal", sparsity=s).attach(model)
        sp.calibrate(model, calib.split(4))
        speeds = {v: [] for v in variants}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so load drift hits all alike
            for v in variants:
                if v in ("sparse", "ordered", "ordered_dense"):
                    enable_sparse_decode(sp, mode="auto" if v == "sparse" else v)
                with sp.disabled() if v == "dense" else contextlib.nullcontext():
                    outputs[v], tps = decode()
                disable_sparse_decode(sp)
                speeds[v].append(tps)
        sp.detach()
        med = {k: statistics.median(v) for k, v in speeds.items()}
        same = torch.equal(outputs["ordered"].sequences, outputs["ordered_dense"].sequences) and all(
            torch.equal(a, b) for a, b in zip(outputs["ordered"].logits, outputs["ordered_dense"].logits))
        part = first_difference(outputs["sparse"], outputs["masked"])
        row = {"sparsity": s, "tokens_per_s": med, "all": speeds, "sparse_over_dense": med["sparse"] / med["dense"],
               "sparse_over_masked": med["sparse"] / med["masked"], "ordered_over_dense": med["ordered"] / med["dense"],
               "ordered_identical_to_ordered_dense": same,
               "sparse_vs_masked_first_different_token": part,
               "identical_tokens_to_masked": part is None}
        results["runs"].append(row)
        print(f"{s:>8.2f}" + "".join(f"{med[v]:>21.2f}" for v in variants)
              + f"{row['sparse_over_dense']:>14.2f}{row['ordered_over_dense']:>15.2f}{str(same):>14}"
              + f"{'same' if part is None else f'parts at {part}':>18}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
