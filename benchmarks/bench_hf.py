"""Benchmark: one training step of a Hugging Face ``LlamaForCausalLM``, HF's default loss against
``crossent.integrations.transformers.patch(model)`` (issue 13, "Floors"), and PyTorch's
``F.linear_cross_entropy`` where the installed PyTorch has it.

Model: ``LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376,
num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=V,
max_position_embeddings=1024))``, ``torch.manual_seed(0)``, float32, ``model.train()``; inputs
and labels random (2, 1024), about 10% of the labels -100. For each V in (32,000, 128,256):

- **Whole step** (forward + backward of the model and its loss, the parameters' ``.grad`` set to
  None before each step): (a) the unpatched model, ``model(input_ids=..., labels=...).loss``
  (HF's default loss: N x V logits, then ``ForCausalLMLoss``); (b) the same model inside
  ``crossent.integrations.transformers.patched(model)`` (unpatched after each step); (c) the base
  model ``model.model(...)`` followed by ``F.linear_cross_entropy(hidden[:, :-1], lm_head.weight,
  labels[:, 1:], options=LinearCrossEntropyOptions())``. Also, for reference, the trunk alone
  (loss ``hidden.sum() * 0``): its peak is the part of the step's peak the loss head does not add.
- **Head only**: on a detached leaf ``hidden = base(...).last_hidden_state.detach()
  .requires_grad_()`` (and ``lm_head.weight``, which requires grad): HF's ``lm_head`` +
  ``model.loss_function`` vs ``crossent.linear_cross_entropy`` (as the patch calls it: labels
  shifted, hidden states not sliced) vs ``F.linear_cross_entropy``.

Times: median over ``--repeats`` rounds after one warm-up of each case, the cases interleaved
round by round in a shuffled order (``random.Random(0)``). Peak extra memory: one step under
``_shared.cpu_peak_bytes`` (torch.profiler's ``[memory]`` events, max of the running sum, checked
first on a lone ``torch.empty``); it includes the gradients.

Usage::

    python benchmarks/bench_hf.py --quick                       # tiny sizes, a smoke test
    python benchmarks/bench_hf.py --out benchmarks/results/hf.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import crossent
import crossent.integrations.transformers as ct
from _shared import cpu_peak_bytes, interleaved_times, validate_cpu_peak
from crossent.bench import machine_info

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # pragma: no cover
    sys.exit("this benchmark needs Hugging Face Transformers: pip install 'crossent[hf]'")

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
DEFAULT = "HF default loss (unpatched)"
CROSSENT = "crossent patch"
TORCH_LCE = f"F.linear_cross_entropy (torch {torch.__version__})"
MiB = 2**20


def build(V: int, D: int, layers: int, heads: int, S: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=D,
        intermediate_size=D * 1376 // 512,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=V,
        max_position_embeddings=S,
    )
    model = LlamaForCausalLM(config).float()
    model.train()
    return model


def torch_lce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    D = hidden.size(-1)
    return F.linear_cross_entropy(
        hidden[:, :-1].reshape(-1, D),
        weight,
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        options=torch.nn.LinearCrossEntropyOptions(),
    )


def stepper(loss_fn: Callable[[], torch.Tensor], clear: Callable[[], None]) -> Callable[[], None]:
    def step() -> None:
        loss_fn().backward()
        clear()

    return step


def measure(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, int]]:
    """(median ms, peak bytes) per step: one warm-up each, interleaved timing, one profiled step."""
    for step in steps.values():
        step()
    times = interleaved_times(steps, repeats)
    return {name: (statistics.median(times[name]), cpu_peak_bytes(step)) for name, step in steps.items()}


def run_vocab(V: int, args: argparse.Namespace, repeats: int) -> dict:
    B, S, D = args.batch, args.seq, args.hidden
    model = build(V, D, args.layers, args.heads, S)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = ids.clone()
    labels[torch.rand(B, S, generator=g) < 0.1] = -100
    W = model.lm_head.weight

    def clear() -> None:
        model.zero_grad(set_to_none=True)

    def default_loss() -> torch.Tensor:
        return model(input_ids=ids, labels=labels).loss

    def crossent_loss() -> torch.Tensor:
        with ct.patched(model):
            return model(input_ids=ids, labels=labels).loss

    def torch_loss() -> torch.Tensor:
        return torch_lce(model.model(input_ids=ids).last_hidden_state, W, labels)

    def trunk_loss() -> torch.Tensor:
        return model.model(input_ids=ids).last_hidden_state.sum() * 0

    losses = {DEFAULT: default_loss, CROSSENT: crossent_loss}
    if HAS_TORCH_LCE:
        losses[TORCH_LCE] = torch_loss
    with torch.no_grad():
        values = {name: fn().item() for name, fn in losses.items()}
    t0 = time.perf_counter()
    step = measure({name: stepper(fn, clear) for name, fn in losses.items()}, repeats)
    trunk_peak = cpu_peak_bytes(stepper(trunk_loss, clear))
    t_step = time.perf_counter() - t0

    # head only, on a detached leaf of the last hidden states
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state
    h = h.detach().requires_grad_()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]

    def clear_head() -> None:
        h.grad = None
        W.grad = None

    heads = {
        DEFAULT: lambda: model.loss_function(model.lm_head(h), labels, vocab_size=V),
        CROSSENT: lambda: crossent.linear_cross_entropy(h.view(-1, D), W, shifted.reshape(-1)),
    }
    if HAS_TORCH_LCE:
        heads[TORCH_LCE] = lambda: torch_lce(h, W, labels)
    t0 = time.perf_counter()
    head = measure({name: stepper(fn, clear_head) for name, fn in heads.items()}, repeats)
    t_head = time.perf_counter() - t0
    return {
        "V": V,
        "repeats": repeats,
        "values": values,
        "step": step,
        "trunk_peak": trunk_peak,
        "head": head,
        "seconds": t_step + t_head,
    }


def table(r: dict) -> list[str]:
    st, hd = r["step"], r["head"]
    t0, hm0 = st[DEFAULT][0], hd[DEFAULT][1]
    trunk = r["trunk_peak"]
    lines = [
        f"### V = {r['V']:,} (median of {r['repeats']} rounds)",
        "",
        f"Trunk alone (loss `hidden.sum() * 0`): step peak {trunk / MiB:.0f} MiB.",
        "",
        "| case | loss | step (ms) | time vs default | step peak (MiB) | step peak - trunk (MiB) "
        "| head only (ms) | head peak (MiB) | head peak vs default |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (t, m) in st.items():
        ht, hm = hd[name]
        lines.append(
            f"| {name} | {r['values'][name]:.5f} | {t:.0f} | {t / t0:.2f}x | {m / MiB:.0f} | "
            f"{(m - trunk) / MiB:.0f} | {ht:.0f} | {hm / MiB:.0f} | {hm / hm0:.3f} |"
        )
    return lines


def floors(results: list[dict]) -> list[str]:
    lines = [
        "### Floors (issue 13): crossent / default, F.linear_cross_entropy / default for reference",
        "",
        "| V | head peak crossent/default (<= 0.25) | holds | step time crossent/default (<= 1.0) "
        "| holds | head peak F.lce/default | step time F.lce/default |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for r in results:
        st, hd = r["step"], r["head"]
        mem = hd[CROSSENT][1] / hd[DEFAULT][1]
        tim = st[CROSSENT][0] / st[DEFAULT][0]
        if TORCH_LCE in st:
            tm = f"{hd[TORCH_LCE][1] / hd[DEFAULT][1]:.3f} | {st[TORCH_LCE][0] / st[DEFAULT][0]:.2f}"
        else:
            tm = "n/a | n/a"
        lines.append(
            f"| {r['V']:,} | {mem:.3f} | {'yes' if mem <= 0.25 else 'NO'} | {tim:.2f} | "
            f"{'yes' if tim <= 1.0 else 'NO'} | {tm} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per V (default 3)")
    ap.add_argument(
        "--repeats-large", type=int, default=None, help="rounds for V=128,256 (default: --repeats)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.hidden, args.layers, args.heads = 2, 128, 64, 2, 4
        vocabs = (1000, 4000)
    else:
        args.batch, args.seq, args.hidden, args.layers, args.heads = 2, 1024, 512, 4, 8
        vocabs = (32_000, 128_256)

    validate_cpu_peak()
    results = []
    for V in vocabs:
        repeats = args.repeats_large if (V == vocabs[-1] and args.repeats_large) else args.repeats
        results.append(run_vocab(V, args, repeats))
        print(f"V={V}: {results[-1]['seconds']:.0f} s", file=sys.stderr)

    info = machine_info("cpu")
    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    lines = [
        "## Hugging Face LlamaForCausalLM training step: default loss vs crossent patch",
        "",
        f"Command: `python benchmarks/bench_hf.py{' --quick' if args.quick else ''}"
        f"{f' --repeats {args.repeats}' if args.repeats != 3 else ''}"
        f"{f' --repeats-large {args.repeats_large}' if args.repeats_large else ''}"
        f"{f' --out {args.out}' if args.out else ''}`",
        "",
        f"Machine: {machine}.",
        "",
        f"Shapes: batch {args.batch}, sequence {args.seq}, hidden {args.hidden}, "
        f"{args.layers} layers, {args.heads} heads, intermediate {args.hidden * 1376 // 512}, "
        f"float32, model.train(); vocabularies {', '.join(f'{v:,}' for v in vocabs)}. "
        f"F.linear_cross_entropy: {'available' if HAS_TORCH_LCE else 'not in this PyTorch'}.",
        "",
        "Step: forward + backward of the whole model and its loss (grads set to None before). "
        "Head only: the loss head on a detached leaf of the last hidden states (+ lm_head.weight). "
        "Peak: extra CPU memory, torch.profiler [memory] events, max of the running sum, "
        "gradients included. Times: median over rounds after one warm-up, cases interleaved "
        "in a shuffled order each round.",
        "",
    ]
    for r in results:
        lines += [*table(r), ""]
    lines += floors(results)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
