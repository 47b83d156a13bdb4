"""``mixedprec reproduce RECIPE``: one of the SBS papers' CIFAR-100 experiments on a local copy of
CIFAR-100 (``--data-dir`` holding ``cifar-100-python/``; nothing is downloaded), printed next to
the paper's row.

A recipe (``RECIPES``) is the schedule as data: the model, the SBS preset, and per stage (float
training unless --weights are given, search, finetune) the epochs, learning rate and lambda.
Each value says where it comes from. The papers' numbers and schedules were searched for and not
found in any source readable while this was written, so the paper row reads "not available" and
the schedule is this project's, labelled so (docs/sbs.md, "Reproducing the papers' CIFAR runs").
``--epochs`` and ``--max-steps`` shrink a run for smoke tests."""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

from mixedprec import sbs
from mixedprec.cli.common import (UsageError, add_run_options, make_out_dir, non_negative_int, positive_int,
                                  resolve_device, say)
from mixedprec.data.cifar import Cifar100, CifarLayoutError
from mixedprec.metrics.report import Reference, model_report
from mixedprec.models import get_model
from mixedprec.reporting import format_table, write_json
from mixedprec.training import evaluate, fit, make_loader, seed_everything

PAPER = ("Single-Path Bit Sharing for Automatic Loss-Aware Model Compression (TPAMI 2023, arXiv 2101.04935; "
         "earlier 'ABS: Automatic Bit Sharing')")
NOT_FOUND = ("not available (source: the paper's CIFAR-100 tables could not be read here: only its abstract was "
             "found, in " + PAPER + ")")
SCHEDULE_SOURCE = ("this project's choice: the papers' epochs, learning rates and lambda were not found in any "
                   "source readable here")


@dataclass(frozen=True)
class Stage:
    epochs: int
    lr: float
    bops_weight: float = 0.0


@dataclass(frozen=True)
class Recipe:
    model: str
    preset: str
    float_training: Stage
    search: Stage
    finetune: Stage
    batch_size: int
    schedule_source: str
    paper_row: dict | None       # the paper's numbers, when a readable source gives them
    paper_source: str


def _cifar_recipe(model: str) -> Recipe:
    return Recipe(model=model, preset="cifar-preresnet", float_training=Stage(200, 0.1), search=Stage(30, 0.01, 0.1),
                  finetune=Stage(30, 0.01), batch_size=128, schedule_source=SCHEDULE_SOURCE, paper_row=None,
                  paper_source=NOT_FOUND)


RECIPES = {"sbs-cifar100-resnet20": _cifar_recipe("resnet20"), "sbs-cifar100-resnet56": _cifar_recipe("resnet56")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=sorted(RECIPES), help="the experiment to run")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="folder holding cifar-100-python/ (train, test, meta pickles as the CIFAR-100 python "
                             "archive unpacks); nothing is downloaded")
    parser.add_argument("--weights", type=Path, default=None,
                        help="trained float weights (a state_dict file) to start from instead of float training")
    parser.add_argument("--epochs", type=non_negative_int, default=None,
                        help="override every stage's epochs (smoke runs; default: the recipe's)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="at most this many steps per epoch: each stage trains on the first max-steps x "
                             "batch-size training images (smoke runs; default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="override the recipe's batch size")
    add_run_options(parser, out="out/reproduce")


def run(args: argparse.Namespace) -> dict:
    recipe, device, quiet = RECIPES[args.recipe], resolve_device(args.device), args.quiet
    try:
        train, test = Cifar100(args.data_dir, train=True), Cifar100(args.data_dir, train=False)
    except CifarLayoutError as exc:
        raise UsageError(f"--data-dir {args.data_dir}: {exc}") from None
    out = make_out_dir(args.out)
    batch_size = args.batch_size or recipe.batch_size
    stages = {name: Stage(getattr(recipe, name).epochs if args.epochs is None else args.epochs,
                          getattr(recipe, name).lr, getattr(recipe, name).bops_weight)
              for name in ("float_training", "search", "finetune")}
    if args.max_steps is not None:
        train = Subset(train, range(min(len(train), args.max_steps * batch_size)))
    common = dict(batch_size=batch_size, seed=args.seed, device=device, quiet=quiet)
    start = time.perf_counter()
    seed_everything(args.seed)
    model = get_model(recipe.model, num_classes=100).to(device)
    if args.weights is not None:
        model.load_state_dict(torch.load(args.weights, map_location=device, weights_only=True))
    else:
        say(quiet, f"float training: {stages['float_training']}")
        fit(model, train, epochs=stages["float_training"].epochs, lr=stages["float_training"].lr,
            phase="float training", **common)
    test_loader = make_loader(test, 256, shuffle=False)
    float_top1 = evaluate(model, test_loader, device)
    reference = Reference.of(model_report(model, (3, 32, 32)))
    net = sbs.convert(model, sbs.SBSPolicy.preset(recipe.preset)).to(device)
    say(quiet, f"search: {stages['search']}")
    sbs.search(net, train, epochs=stages["search"].epochs, lr=stages["search"].lr,
               bops_weight=stages["search"].bops_weight, **common)
    say(quiet, f"finetune: {stages['finetune']}")
    sbs.finetune(net, train, epochs=stages["finetune"].epochs, lr=stages["finetune"].lr, **common)
    exported = sbs.export(net).model
    report = model_report(exported, (3, 32, 32), reference)
    measured = {"float top-1 %": float_top1, "top-1 %": evaluate(exported, test_loader, device),
                "BOPs": report.bops, "BOPs reduction": report.bops_reduction, "weights real x": report.real_rate,
                "weights paper x": report.paper_rate}
    text = comparison(args.recipe, recipe, measured)
    record = {"recipe": args.recipe, "schedule": asdict(recipe), "run": {k: asdict(v) for k, v in stages.items()},
              "max_steps": args.max_steps, "training_images": len(train), "measured": measured,
              "paper": recipe.paper_row, "paper_source": recipe.paper_source, "report": report.to_dict(),
              "seconds": time.perf_counter() - start}
    write_json(out / f"{args.recipe}.json", record)
    print(text)
    print(report.table())
    print(f"record: {out / (args.recipe + '.json')}")
    return record


def comparison(name: str, recipe: Recipe, measured: dict) -> str:
    """The paper's row above the measured one (the paper's cells say why when they are missing)."""
    columns = list(measured)
    paper = ["not available"] * len(columns) if recipe.paper_row is None else [
        _cell(recipe.paper_row.get(c)) for c in columns]
    table = format_table(("row", *columns), [("paper", *paper), ("measured", *(_cell(measured[c]) for c in columns))])
    return "\n".join([f"{name}: {recipe.model} on CIFAR-100, preset {recipe.preset}", table,
                      f"paper row: {recipe.paper_source}", f"schedule: {recipe.schedule_source}"])


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.2f}"
