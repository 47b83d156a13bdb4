"""``mixedprec compress {sbs,opq}``: a zoo or user model on digits, CIFAR or an image folder.

Every training stage checkpoints into ``<out>/checkpoints/`` and the finetuned model is kept there
before it is packed (``mixedprec.cli.runs``): ``--resume`` continues an interrupted run from its
last completed stage and epoch, and a failure while packing, saving or evaluating names the kept
model and exits with status 1. The packed file records the model's factory, so ``mixedprec.load``
and ``mixedprec report`` rebuild a user's model from its code.

Under ``torchrun --nproc-per-node N -m mixedprec compress ...`` the training runs data-parallel
on N processes (--batch-size is the global batch); rank 0 prints, packs, saves and evaluates."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mixedprec import distributed, opq, sbs
from mixedprec.cli import pipeline
from mixedprec.cli.common import (UsageError, add_run_options, make_out_dir, non_negative_float, non_negative_int,
                                  positive_float, positive_int, resolve_device, say)
from mixedprec.cli.inputs import DATA_SOURCES, build_model, factory_name, load_data, load_weights, parse_model_args
from mixedprec.cli.runs import Run
from mixedprec.models import MODELS
from mixedprec.nn.factory import build as factory_build
from mixedprec.nn.factory import is_trusted
from mixedprec.reporting import Reference, model_report
from mixedprec.training import evaluate

MODEL_HELP = (f"the model: a zoo name ({', '.join(sorted(MODELS))}), or module:function / path/to/file.py:function "
              f"returning a torch.nn.Module (default: digits_cnn)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = parser.add_subparsers(dest="method", metavar="{sbs,opq}", required=True)
    sbs_parser = methods.add_parser(
        "sbs", help="SBS: search per-layer bits {2,4,8} and filter-group pruning under a BOPs penalty, finetune",
        description="SBS (Single-Path Bit Sharing): convert the model, search each layer's weight and activation "
                    "bits and filter-group pruning under CE + lambda * log(BOPs), finetune the chosen configuration, "
                    "export (pruned channels removed), pack, save, reload and evaluate. See docs/sbs.md.")
    _add_common(sbs_parser)
    g = sbs_parser.add_argument_group("SBS")
    g.add_argument("--bops-weight", type=non_negative_float, default=0.1,
                   help="lambda in CE + lambda * log(BOPs): larger gives fewer BOPs (default: 0.1)")
    g.add_argument("--search-epochs", type=non_negative_int, default=10, help="search epochs (default: 10)")
    g.add_argument("--preset", choices=sbs.SBSPolicy.PRESET_NAMES, default=None,
                   help="the SBS authors' settings for a family of networks (group size, thresholds per group, "
                        "first/last bits, activation grid; docs/sbs.md lists each with its source); the options "
                        "below override it (default: no preset, the defaults below)")
    g.add_argument("--weight-bits", type=positive_int, nargs="+", default=None,
                   help="candidate weight bitwidths, ascending, each dividing the next (default: 2 4 8)")
    g.add_argument("--act-bits", type=positive_int, nargs="+", default=None,
                   help="candidate activation bitwidths (default: 2 4 8)")
    g.add_argument("--group-size", type=positive_int, default=None,
                   help="filters per pruning group (default: the preset's, else 4)")
    g.add_argument("--act-grid", choices=("unsigned", "signed", "asymmetric"), default=None,
                   help="grid of activations that hold negative values: signed (no zero level), unsigned (negative "
                        "values clipped), asymmetric (a learnable offset, exact zero level) (default: the preset's, else signed)")
    g.add_argument("--no-prune", action="store_true", help="search bits only, no filter pruning")
    opq_parser = methods.add_parser(
        "opq", help="OPQ: allocate pruning and codebooks analytically for a compression rate, finetune",
        description="OPQ (One-shot Pruning-Quantization): compute each layer's pruning ratio, bitwidth and shared "
                    "codebook from the trained weights for a target compression rate, convert, finetune with masks "
                    "and codebooks frozen, pack, save, reload and evaluate. See docs/opq.md.")
    _add_common(opq_parser)
    g = opq_parser.add_argument_group("OPQ")
    g.add_argument("--rate", type=positive_float, default=20.0,
                   help="target compression rate of the conv/linear weights (default: 20)")
    g.add_argument("--cost", choices=opq.COST_KINDS, default="packed",
                   help="how the rate counts: packed = real bytes of the packed format (codes, bitmaps, codebooks, "
                        "scales, headers); paper = bits of kept codes only, as the papers count (default: packed)")
    g.add_argument("--bits", type=int, nargs="+", choices=opq.BIT_CHOICES, default=list(opq.BIT_CHOICES), metavar="B",
                   help="candidate bitwidths of the allocation, e.g. --bits 2 4 8 for the widths the CPU kernels "
                        "decode fastest (docs/kernels.md; default: every width 1..8)")
    g.add_argument("--levels", choices=opq.LEVEL_KINDS, default="lloyd",
                   help="codebook levels: lloyd (Lloyd-Max for the Laplace model) or uniform (default: lloyd)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="digits_cnn", help=MODEL_HELP)
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model function, repeatable; VALUE is a Python literal or a string "
                        "(e.g. --model-arg width=16). Zoo models get num_classes and in_channels from the data")
    g.add_argument("--weights", type=Path, default=None,
                   help="trained float weights: a torch state_dict file (.pt/.pth; also a checkpoint dict with "
                        "'state_dict' or 'model'). Without it the model is first trained from scratch "
                        "for --float-epochs")
    g.add_argument("--float-epochs", type=non_negative_int, default=20,
                   help="float training epochs when no --weights are given (default: 20)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATA_SOURCES, default="digits",
                   help="digits: scikit-learn's 8x8 digits (embedded); cifar10/cifar100: a torchvision download "
                        "in --data-dir; imagefolder: --data-dir with train/ and val/ (or test/) class folders. "
                        "Nothing is ever downloaded (default: digits)")
    g.add_argument("--data-dir", type=Path, default=None, help="folder of the data set for cifar10, cifar100, imagefolder")
    g.add_argument("--image-size", type=positive_int, default=224,
                   help="imagefolder: images are resized and center-cropped to this size (default: 224)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default: 64)")
    g = parser.add_argument_group("training")
    g.add_argument("--finetune-epochs", type=non_negative_int, default=10, help="finetuning epochs (default: 10)")
    g.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate of search and finetuning (default: 0.01)")
    g.add_argument("--float-lr", type=positive_float, default=0.05, help="SGD learning rate of float training (default: 0.05)")
    add_run_options(parser, out="out/compress")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --out from its last completed stage and epoch "
                             "(checkpoints in OUT/checkpoints/; the other options must be the ones it was started with)")


def run(args: argparse.Namespace) -> dict:
    device = distributed.setup(resolve_device(args.device))
    quiet = args.quiet or not distributed.is_main()
    policy = _policy(args) if args.method == "sbs" else None  # checked before any work is done
    data = load_data(args.data, args.data_dir, image_size=args.image_size, seed=args.seed)
    torch.manual_seed(args.seed)
    model_args = parse_model_args(args.model_arg)
    model, model_args = build_model(args.model, model_args, data)
    factory = factory_name(args.model)
    if args.weights is not None:
        load_weights(model, args.weights)
    elif args.float_epochs == 0:
        raise UsageError("no --weights given and --float-epochs is 0: there is no trained model to compress")
    if args.method == "opq":
        pipeline.check_opq_rate(model, args.rate, bits=args.bits, cost=args.cost, levels=args.levels,
                                option="--rate")
    out = make_out_dir(args.out)
    run = Run(out, args, quiet=quiet)
    record = {"model": args.model, "factory": factory, "model_args": model_args, "data": data.name,
              "weights": None if args.weights is None else str(args.weights), "command": f"compress {args.method}"}
    start = time.perf_counter()
    if args.weights is None:
        say(quiet, f"training {args.model} in float on {data.name} for {args.float_epochs} epochs")
        pipeline.train_float(model, data, epochs=args.float_epochs, lr=args.float_lr, batch_size=args.batch_size,
                             seed=args.seed, device=device, quiet=quiet, run=run)
    model.to(device)
    float_top1 = evaluate(model, pipeline.eval_loader(data), device)
    reference = Reference.of(model_report(model, data.input_shape))
    say(quiet, f"float top-1 {float_top1:.2f}% on {data.name}'s test split; compressing with {args.method.upper()}")
    common = dict(lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=device, quiet=quiet, run=run)
    if args.method == "sbs":
        compressed = pipeline.compress_sbs(model, data, policy=policy, search_epochs=args.search_epochs,
                                           finetune_epochs=args.finetune_epochs, bops_weight=args.bops_weight, **common)
    else:
        compressed = pipeline.compress_opq(model, data, rate=args.rate, bits=args.bits, cost=args.cost,
                                           levels=args.levels, finetune_epochs=args.finetune_epochs, **common)
    if not distributed.is_main():  # the trained model is the same on every rank: one deploys it
        return {}
    try:
        result = pipeline.deploy(compressed, out / "packed.safetensors", data, device=device, reference=reference,
                                 record={**record, "float_top1": float_top1}, factory=factory,
                                 factory_kwargs=model_args, skeleton=factory_build(factory, model_args))
    except Exception as exc:  # the program's failure, not the user's: say where the work is
        raise run.failed("packing, saving or evaluating the compressed model", exc) from exc
    run.complete()
    print(result.report.table())
    print(f"{compressed.method}: top-1 {result.top1:.2f}% (float {float_top1:.2f}%, before packing "
          f"{result.top1_before_packing:.2f}%), {result.report.bops_reduction:.1f}x fewer BOPs, weights "
          f"{result.report.real_rate:.2f}x smaller in real bytes ({result.report.paper_rate:.2f}x as the papers "
          f"count), {time.perf_counter() - start:.1f} s")
    print(f"packed model: {result.path}\nrecord: {pipeline.record_path(Path(result.path))}")
    if not is_trusted(factory):
        print(f"to load it: mixedprec.load({result.path!r}, model=<a freshly built {args.model}>), or with "
              f"trust_code=True (`mixedprec report {result.path} --trust-code`), which calls {factory}")
    return result.to_dict()


def _policy(args: argparse.Namespace) -> sbs.SBSPolicy:
    given = {"weight_bits": args.weight_bits, "act_bits": args.act_bits, "group_size": args.group_size,
             "act_grid": args.act_grid}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    overrides["prune"] = not args.no_prune
    try:
        policy = (sbs.SBSPolicy(**overrides) if args.preset is None else sbs.SBSPolicy.preset(args.preset, **overrides))
        return policy
    except ValueError as exc:
        raise UsageError(str(exc).replace("SBSPolicy: weight_bits", "--weight-bits")
                         .replace("SBSPolicy: act_bits", "--act-bits")) from None
