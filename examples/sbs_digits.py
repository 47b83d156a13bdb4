"""SBS on scikit-learn's digits, end to end, reproducible from one command:

    .venv/bin/python examples/sbs_digits.py --out runs/sbs_digits

Trains the float digits CNN, converts it, searches bits and filter-group pruning under the
BOPs penalty, finetunes the fixed configuration, exports the pruned model, and prints float
and SBS accuracy, the BOPs reduction and the per-layer table. Everything runs on CPU with a
fixed seed; checkpoints in --out make an interrupted run resume where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from mixedprec import sbs
from mixedprec.data.digits import load_digits
from mixedprec.metrics import bops_table, count_bops, format_bops_table
from mixedprec.models import digits_cnn
from mixedprec.training import evaluate, fit, make_loader


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sbs_digits", help="folder for checkpoints, config and results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--search-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--bops-weight", type=float, default=0.1, help="lambda in CE + lambda * log(BOPs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the same numbers on any machine

    data = load_digits(seed=args.seed)
    test = make_loader(data.test, 256, shuffle=False)
    float_path = os.path.join(args.out, "float.pt")
    torch.manual_seed(args.seed)  # the float model's initial weights
    model = digits_cnn(num_classes=data.num_classes)
    if os.path.exists(float_path):
        model.load_state_dict(torch.load(float_path, weights_only=True))
    else:
        fit(model, data.train, epochs=args.float_epochs, lr=0.05, seed=args.seed, quiet=args.quiet)
        torch.save(model.state_dict(), float_path)
    float_acc, float_bops = evaluate(model, test), count_bops(model, data.input_shape)

    model = sbs.convert(model, sbs.SBSPolicy())
    sbs.search(model, data.train, epochs=args.search_epochs, bops_weight=args.bops_weight, lr=0.01, seed=args.seed,
               checkpoint=os.path.join(args.out, "search.pt"), quiet=args.quiet)
    sbs.finetune(model, data.train, epochs=args.finetune_epochs, lr=0.01, seed=args.seed,
                 checkpoint=os.path.join(args.out, "finetune.pt"), quiet=args.quiet)
    exported = sbs.export(model)
    sbs_acc, sbs_bops = evaluate(exported.model, test), count_bops(exported.model, data.input_shape)

    results = {"float_acc": float_acc, "sbs_acc": sbs_acc, "float_bops": float_bops, "sbs_bops": sbs_bops,
               "bops_reduction": float_bops / sbs_bops, "args": vars(args)}
    sbs.save_config(model, os.path.join(args.out, "config.json"), **results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_bops_table(bops_table(model, data.input_shape)))  # kept/total channels before export
    print(f"float: {float_acc:.2f}% at {float_bops:,} BOPs | SBS: {sbs_acc:.2f}% at {sbs_bops:,} BOPs "
          f"| reduction {results['bops_reduction']:.1f}x | accuracy change {sbs_acc - float_acc:+.2f} points")
    return results


if __name__ == "__main__":
    main()
