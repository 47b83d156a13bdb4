"""OPQ on the embedded digits task, against uniform allocation at the same budget.

    .venv/bin/python examples/opq_digits.py                 # 20x real bytes, ~2-4 min on 2 cores
    .venv/bin/python examples/opq_digits.py --rates 20 28 --out runs/opq_digits

Trains digits_cnn in float, then for each target rate and each allocation (OPQ's Lagrangian,
and the same bits and sparsity in every layer) allocates with cost="packed" (real bytes of the
packed format: codes, bitmaps, codebooks, scales, headers), converts, finetunes with masks and
codebooks frozen, and reports test accuracy before and after finetuning with both compression
rates. Deterministic for a seed (CPU).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mixedprec.data.digits import load_digits
from mixedprec.metrics import compression_report
from mixedprec.models import digits_cnn
from mixedprec.opq import allocate, allocate_uniform, convert, finetune
from mixedprec.training import evaluate, fit, make_loader, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[20.0], help="target real-bytes compression rates")
    parser.add_argument("--levels", choices=["lloyd", "uniform"], default="lloyd")
    parser.add_argument("--epochs", type=int, default=15, help="float training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the plans (JSON)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    data = load_digits(seed=args.seed)
    test_loader = make_loader(data.test, 256, shuffle=False)
    seed_everything(args.seed)  # the initial weights too
    model = fit(digits_cnn(), data.train, epochs=args.epochs, lr=0.05, seed=args.seed, quiet=args.quiet)
    float_acc = evaluate(model, test_loader)
    print(f"float accuracy: {float_acc:.2f}%")

    rows = []
    for rate in args.rates:
        for method, allocator in (("opq", allocate), ("uniform", allocate_uniform)):
            plan = allocator(model, rate, cost="packed", levels=args.levels, quiet=args.quiet)
            print(f"\n{plan.table()}")
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                plan.save(args.out / f"plan_{method}_{rate:g}x.json")
            compressed = convert(model, plan)
            before = evaluate(compressed, test_loader)
            finetune(compressed, data.train, epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed,
                     quiet=args.quiet)
            report = compression_report(compressed)
            rows.append((rate, method, report.real_rate, report.paper_rate, report.packed_bytes, before,
                         evaluate(compressed, test_loader)))

    print(f"\nfloat accuracy {float_acc:.2f}% ({compression_report(model).float_bytes} weight bytes)")
    print(f"{'target':>7} {'allocation':<10} {'real x':>7} {'paper x':>8} {'bytes':>7} {'acc before ft':>14} "
          f"{'acc after ft':>13} {'drop':>6}")
    for rate, method, real, paper, packed, before, after in rows:
        print(f"{rate:>7g} {method:<10} {real:>7.2f} {paper:>8.2f} {packed:>7} {before:>13.2f}% {after:>12.2f}% "
              f"{float_acc - after:>6.2f}")


if __name__ == "__main__":
    main()
