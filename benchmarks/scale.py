"""The paper-scale workload on one device: every stage of a run at a real model's shape.

Builds a randomly initialised model of a named real shape on ``--device`` in ``--dtype``
(random weights: the costs count, not the quality) and measures, per method:

- calibration time (``--calib-sequences`` x ``--seq-len`` tokens, the method's default
  passes; R-Sparse's SVD setup and LaRoSA's covariance included);
- sparse / dense forward time at 1 x L and 4 x L (decoder blocks, interleaved repeats, medians);
and, with TEAL + one SPON neuron per projection:
- α training step time and peak device memory, with and without gradient checkpointing,
  at batch 1 and 4 (teacher forward every step, as for never-revisited sequences);
- the fold check (``max_abs_logit_diff``, must be 0);
- perplexity throughput (tokens/s) of the dense and the sparse model;
- the projected wall time of the paper's run: calibrate + 150 α steps + dense, sparse and
  +SPON perplexity over WikiText-2's ~290k test tokens.

JSON goes to ``benchmarks/results/scale_<device>[_small].json``. Only the library path is
used (no Hydra, W&B, lm-eval, datasets), so it runs on a bare GPU node with torch and
transformers.

    python benchmarks/scale.py --small                                   # a tiny shape on the CPU (a test runs it)
    python benchmarks/scale.py --device cuda --dtype bfloat16 --shape llama3_8b
    python benchmarks/scale.py --device cuda --dtype bfloat16 --shape llama3_70b --layers 10
    # the CPU targets, side by side on the packaged model (real weights and text):
    python benchmarks/scale.py --shape packaged --device cpu --dtype float32 --seq-len 512 \
        --calib-sequences 16 --methods teal teal_greedy wina rsparse larosa --skip throughput training
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("teal", "wina", "rsparse", "larosa")
# calibration-only rows: TEAL's greedy per-layer allocation beside its uniform one (target <= 3x)
VARIANTS = {"teal_greedy": ("teal", {"allocation": "greedy"})}
FORWARD_TARGET, GREEDY_TARGET = 1.10, 3.0  # issue 12: sparse / dense forward; greedy / uniform calibration
PAPER_EVAL_TOKENS = 290_000  # WikiText-2 test split, Llama-3 tokenizer (~287k)
PAPER_SPON_STEPS = 150

# Real shapes (from each model's config.json); the layer count can be cut with --layers.
SHAPES = {
    "llama3_8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192)),
    "mistral_7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                   rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None)),
    "qwen3_8b": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               rope_theta=1000000.0, max_position_embeddings=40960)),
    "llama3_70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                 rope_theta=500000.0, max_position_embeddings=8192)),
    # the packaged SmolLM2-135M with its real weights and calibration text: the CPU targets
    "packaged": ("packaged", {}),
    # --small: seconds on a CPU
    "small": ("llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)),
}


def build_model(shape: str, layers: int | None, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    family, kwargs = SHAPES[shape]
    if family == "packaged":
        from spon_exp.models.loading import load_model

        loaded = load_model(dtype=dtype, device=device)
        return loaded.model, loaded.tokenizer
    kwargs = dict(kwargs)
    if layers:
        kwargs["num_hidden_layers"] = layers
    config = AutoConfig.for_model(family, **kwargs, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: an 8B model in seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, None


def token_batches(model, tokenizer, sequences: int, seq_len: int, split: str, seed: int) -> torch.Tensor:
    """Real text for a real model (the packaged corpus), random tokens for a random one."""
    if tokenizer is not None:
        from spon_exp.data.corpora import token_blocks

        return token_blocks(tokenizer, "wikipedia", split, seq_len, max_blocks=sequences)
    return torch.randint(0, model.config.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(seed))


class Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def forward_ratio(model, sparsifier, ids: torch.Tensor, clock: Clock, repeats: int) -> dict:
    body = model.get_decoder()

    def fwd():
        with torch.no_grad():
            body(input_ids=ids, use_cache=False)

    fwd()  # warm-up
    dense, sparse = [], []
    for _ in range(repeats):
        with sparsifier.disabled():
            dense.append(clock.time(fwd))
        sparse.append(clock.time(fwd))
    d, s = statistics.median(dense), statistics.median(sparse)
    return {"dense_s": d, "sparse_s": s, "ratio": s / d, "ratio_ci": ratio_interval(dense, sparse),
            "dense_runs_s": dense, "sparse_runs_s": sparse}


def ratio_interval(dense: list[float], sparse: list[float]) -> list[float] | None:
    """95 % paired-bootstrap interval of median(sparse) / median(dense): the repeats are
    resampled with the same indices for both (each sparse forward ran right after its dense
    one, so a slow spell of the machine moves both). None below 3 repeats."""
    from spon_exp.evaluation.uncertainty import Bootstrap

    if len(dense) < 3:
        return None
    boot = Bootstrap()
    idx = boot.indices(len(dense))
    d = torch.tensor(dense, dtype=torch.float64)[idx].quantile(0.5, dim=1)
    s = torch.tensor(sparse, dtype=torch.float64)[idx].quantile(0.5, dim=1)
    return boot.interval(s / d)


def verdict(value: float, interval: list[float] | None, target: float) -> str:
    """met / missed where the interval is on one side of the target, else within noise."""
    if interval is None:
        return "met" if value <= target else "missed"
    return "met" if interval[1] <= target else "missed" if interval[0] > target else "at the target within noise"


def method_stage(name: str, model, calib: torch.Tensor, ids: torch.Tensor, args, clock: Clock) -> tuple[dict, object]:
    from spon_exp.sparsifiers import build_sparsifier

    method, options = VARIANTS.get(name, (name, {}))
    sp = build_sparsifier(method, sparsity=args.sparsity, **options).attach(model)
    out: dict = {}
    if name == "rsparse":
        out["svd_setup_s"] = clock.time(sp.compute_factors)
    batches = list(calib.split(args.calib_batch))
    out["calibrate_s"] = clock.time(lambda: sp.calibrate(model, batches))
    with sp.measuring(), torch.no_grad():
        model.get_decoder()(input_ids=ids[:1], use_cache=False)
    out["measured_sparsity"] = sp.measured_sparsity()["model"]
    if name in VARIANTS:  # a calibration variant: its forward is its method's
        print(f"{name:>11}: calibrate {out['calibrate_s']:.1f} s, measured sparsity {out['measured_sparsity']:.3f}",
              flush=True)
        return out, sp
    for batch in (1, 4):
        out[f"forward_{batch}x{args.seq_len}"] = forward_ratio(model, sp, ids[:batch], clock, args.repeats)
    print(f"{name:>11}: calibrate {out['calibrate_s']:.1f} s"
          + (f" (SVD {out['svd_setup_s']:.1f} s)" if "svd_setup_s" in out else "")
          + f", sparse/dense {out[f'forward_1x{args.seq_len}']['ratio']:.2f} (1x{args.seq_len}) "
          f"{out[f'forward_4x{args.seq_len}']['ratio']:.2f} (4x{args.seq_len}), measured sparsity "
          f"{out['measured_sparsity']:.3f}", flush=True)
    return out, sp


def training_stage(model, sparsifier, args, clock: Clock) -> dict:
    from spon_exp.spon import Spon, TrainConfig, fold_alpha_checked, train_alpha

    spon = Spon(sparsifier, 1)
    seqs = torch.randint(0, model.config.vocab_size, (8, args.seq_len),
                         generator=torch.Generator().manual_seed(2))
    out: dict = {}
    for checkpointing in (False, True):
        for batch in (1, 4):
            cfg = dict(lr=1e-4, batch_size=batch, gradient_checkpointing=checkpointing, cache_teacher=False)
            train_alpha(model, sparsifier, spon, seqs, TrainConfig(steps=1, **cfg))  # warm-up
            clock.reset_peak()
            result = train_alpha(model, sparsifier, spon, seqs, TrainConfig(steps=args.train_steps, **cfg))
            key = f"batch{batch}_{'checkpointing' if checkpointing else 'no_checkpointing'}"
            out[key] = {"step_s": result.seconds / args.train_steps, "peak_memory_gb": clock.peak_gb()}
            peak = out[key]["peak_memory_gb"]
            print(f"  α step {key}: {out[key]['step_s']:.3f} s"
                  + (f", peak {peak:.1f} GB" if peak is not None else ""), flush=True)
    _, report = fold_alpha_checked(model, spon, seqs[:1].to(args.device), checked_on=f"1 x {args.seq_len} tokens")
    out["fold"] = report
    print(f"  fold check: max |Δlogit| {report['max_abs_logit_diff']}", flush=True)
    return out


def throughput_stage(model, sparsifier, args, clock: Clock) -> dict:
    from spon_exp.evaluation.perplexity import PerplexityProtocol, block_nll

    blocks = torch.randint(0, model.config.vocab_size, (args.ppl_sequences, args.seq_len),
                           generator=torch.Generator().manual_seed(3))
    protocol = PerplexityProtocol(seq_len=args.seq_len, batch_size=args.ppl_batch)
    tokens = blocks.numel()
    out = {}
    for variant in ("dense", "sparse"):
        with sparsifier.disabled() if variant == "dense" else contextlib.nullcontext():
            block_nll(model, blocks[: args.ppl_batch], protocol)  # warm-up
            out[f"{variant}_tokens_per_s"] = tokens / clock.time(lambda: block_nll(model, blocks, protocol))
    print(f"  perplexity throughput: dense {out['dense_tokens_per_s']:.0f} tok/s, "
          f"sparse {out['sparse_tokens_per_s']:.0f} tok/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    ap.add_argument("--layers", type=int, default=None, help="cut the layer count (70B on one GPU: ~10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *VARIANTS],
                    help=f"methods to calibrate and time; also {', '.join(VARIANTS)} (calibration only)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "training"],
                    help="stages to leave out (e.g. for the per-method CPU targets on --shape packaged)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-sequences", type=int, default=16)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--ppl-sequences", type=int, default=8)
    ap.add_argument("--ppl-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny shape on the CPU: checks the script runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.small:
        args.shape, args.device, args.dtype, args.layers = "small", "cpu", "float32", None
        args.seq_len, args.calib_sequences, args.calib_batch = 64, 4, 2
        args.ppl_sequences, args.ppl_batch, args.train_steps, args.repeats = 4, 2, 2, 1
    dtype = getattr(torch, args.dtype)
    clock = Clock(args.device)
    from spon_exp.hostmem import applies_to_run, keep_freed_memory

    # as the spon-exp CLI does (a CPU run only), for both arms alike
    report_host = {"keep_freed_memory": applies_to_run(args.device) and keep_freed_memory()}

    t0 = time.perf_counter()
    model, tokenizer = build_model(args.shape, args.layers, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape} ({model.config.num_hidden_layers} layers, {n_params / 1e9:.2f} B parameters) on "
          f"{args.device} in {args.dtype}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    calib = token_batches(model, tokenizer, args.calib_sequences, args.seq_len, "calibration", seed=0)
    ids = token_batches(model, tokenizer, 4, args.seq_len, "evaluation", seed=1).to(args.device)
    report: dict = {"shape": args.shape, "layers": model.config.num_hidden_layers, "parameters": n_params,
                    "device": args.device, "device_name": (torch.cuda.get_device_name() if clock.cuda
                                                           else platform.processor() or platform.machine()),
                    "dtype": args.dtype, "torch": torch.__version__, "sparsity": args.sparsity,
                    "seq_len": args.seq_len, "calib_tokens": calib.numel(), **report_host, "methods": {}}
    teal = None
    for name in args.methods:  # one method attached at a time
        report["methods"][name], sp = method_stage(name, model, calib, ids, args, clock)
        sp.detach()
        teal = sp if name == "teal" else teal
    ratios = {f"{n}_sparse_over_dense_4x{args.seq_len}": r[f"forward_4x{args.seq_len}"]["ratio"]
              for n, r in report["methods"].items() if f"forward_4x{args.seq_len}" in r}
    methods = report["methods"]
    if "teal_greedy" in methods and "teal" in methods:
        ratios["teal_greedy_over_uniform_calibration"] = methods["teal_greedy"]["calibrate_s"] / methods["teal"]["calibrate_s"]
    report["ratios"] = ratios
    targets = {}
    for n, r in methods.items():
        if f"forward_4x{args.seq_len}" in r:
            f = r[f"forward_4x{args.seq_len}"]
            targets[f"{n}_sparse_over_dense_4x{args.seq_len}"] = {
                "value": f["ratio"], "ci": f["ratio_ci"], "target": FORWARD_TARGET,
                "verdict": verdict(f["ratio"], f["ratio_ci"], FORWARD_TARGET)}
    if "teal_greedy_over_uniform_calibration" in ratios:  # one timing each: no interval
        g = ratios["teal_greedy_over_uniform_calibration"]
        targets["teal_greedy_over_uniform_calibration"] = {"value": g, "ci": None, "target": GREEDY_TARGET,
                                                           "verdict": verdict(g, None, GREEDY_TARGET)}
    report["targets"] = targets
    if clock.cuda:  # which top-k each width ran (the Triton kernel or torch, timed at first use)
        from spon_exp.sparsifiers.scoring import _GPU_CHOICE

        report["topk_path"] = {f"{w} {str(dt).removeprefix('torch.')}{' scaled' if scaled else ''}": choice
                               for (_, w, dt, scaled), choice in _GPU_CHOICE.items()}
    for k, t in targets.items():
        ci = f" [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]" if t["ci"] else ""
        print(f"{k} {t['value']:.3f}{ci} (target <= {t['target']}): {t['verdict']}", flush=True)
    stages = [st for st in ("throughput", "training") if st not in args.skip]
    if stages:
        if teal is None:
            teal = method_stage("teal", model, calib, ids, args, clock)[1]
        else:
            teal.attach(model)  # thresholds kept from its calibration
    if "throughput" in stages:
        report["throughput"] = throughput_stage(model, teal, args, clock)
    if "training" in stages:
        report["training"] = training_stage(model, teal, args, clock)
    if len(stages) == 2:
        t = report["throughput"]
        projected = {
            "calibrate_s": methods.get("teal", {}).get("calibrate_s"),
            "train_alpha_s": PAPER_SPON_STEPS * report["training"]["batch1_no_checkpointing"]["step_s"],
            "ppl_dense_s": PAPER_EVAL_TOKENS / t["dense_tokens_per_s"],
            "ppl_sparse_s": PAPER_EVAL_TOKENS / t["sparse_tokens_per_s"],
            "ppl_spon_s": PAPER_EVAL_TOKENS / t["sparse_tokens_per_s"],  # folded: the sparse model's cost
        }
        projected["total_s"] = sum(v for v in projected.values() if v is not None)
        report["projected_paper_run"] = projected
        print(f"projected paper run (TEAL + SPON, {PAPER_SPON_STEPS} steps, 3 x {PAPER_EVAL_TOKENS} eval tokens): "
              f"{projected['total_s'] / 60:.1f} min", flush=True)
    suffix = "_small" if args.small else ("_packaged" if args.shape == "packaged" else "")
    out = args.out or RESULTS / f"scale_{args.device.split(':')[0]}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
