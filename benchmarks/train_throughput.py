"""Training throughput (issue 15): stamps per second reaching the optimiser, GalSim vs torch backend.

For each backend the README's training configuration (``conf/train.yaml``: the embedded parametric
source, full CLASH noise, the data group's workers and batch size) trains the paper CNN with a
Lightning Trainer for ``--epochs`` passes of ``--samples`` stamps, validation off; a callback
times every training epoch. The first pass (workers start, radial tables and galaxies prepared)
is reported apart from the later ones (workers persist, so what they prepared is reused). The
CNN alone, on stamps already in memory with the same optimiser step, is the ceiling.

    python benchmarks/train_throughput.py                 # both backends, 3 epochs of 6000 stamps
    python benchmarks/train_throughput.py --backends galsim torch torch_device   # + stamps drawn on the device
    python benchmarks/train_throughput.py --samples 20000 --backends torch --epochs 2

``torch_device`` is the torch backend with ``data.render_on_device=true``: the workers only plan
each batch, the trainer's device draws it (on this CPU-only machine the main process does, so
it competes with the optimiser for the same cores; on a GPU it is the path that keeps the GPU fed).

Writes ``benchmarks/RESULTS_train_throughput.md`` (full table) and replaces the summary line
``end-to-end training stream: torch N stamps/s = R.Rx GalSim`` in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from _machine import machine_header

REPO = Path(__file__).resolve().parents[1]
LINE = "end-to-end training stream"
#: benchmark row -> train.py data overrides
VARIANTS = {"galsim": ["data.backend=galsim"], "torch": ["data.backend=torch"],
            "torch_device": ["data.backend=torch", "data.render_on_device=true"]}
#: validation is off, so the LR-on-plateau scheduler watches the training loss
BASE = ["model.scheduler_monitor=train/loss_epoch"]


ACCELERATOR = {"name": "auto"}  # --accelerator


def _trainer(epochs: int, callbacks):
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator=ACCELERATOR["name"], devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=callbacks)


def _timer():
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self):
            self.t0, self.seconds = None, []

        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(time.perf_counter() - self.t0)

    return EpochTimer()


def stream_rate(backend: str, samples: int, epochs: int, overrides: list[str]) -> dict:
    """Train ``epochs`` passes on ``backend``; stamps/s of the first and of the later passes."""
    import torch
    from hydra.utils import instantiate

    from wlshear.utils.hydra import compose_config
    from wlshear.utils.threads import cpu_training_threads

    cfg = compose_config("train", [*VARIANTS[backend], f"data.samples_per_epoch={samples}",
                                   "data.val_size=2", f"paths.root_dir={REPO}", *BASE,
                                   f"paths.output_dir={REPO / 'outputs' / 'bench_throughput'}", *overrides])
    torch.manual_seed(0)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model)
    timer = _timer()
    trainer = _trainer(epochs, [timer])
    on_cpu = trainer.strategy.root_device.type == "cpu"
    with cpu_training_threads(int(cfg.data.num_workers), on_cpu) as threads:  # as train.py does
        trainer.fit(model, datamodule=dm)
    rates = [samples / s for s in timer.seconds]
    return {"backend": backend, "samples_per_epoch": samples, "num_workers": int(cfg.data.num_workers),
            "train_threads": int(threads),
            "batch_size": int(cfg.data.batch_size), "epoch_s": timer.seconds, "first_epoch": rates[0],
            "later_epochs": float(np.mean(rates[1:])) if len(rates) > 1 else float("nan")}


def cnn_ceiling(samples: int, overrides: list[str]) -> float:
    """Stamps/s of the same training step on stamps already in memory (no rendering)."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, TensorDataset

    from wlshear.utils.hydra import compose_config

    cfg = compose_config("train", [f"paths.root_dir={REPO}", *BASE, *overrides])
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(0, 3.6e-3, (samples, 32, 32)), dtype=torch.float32)
    y = torch.as_tensor(rng.uniform(-0.2, 0.2, (samples, 2)), dtype=torch.float32)
    loader = DataLoader(TensorDataset(x, y), batch_size=int(cfg.data.batch_size), shuffle=True)
    model = instantiate(cfg.model)
    timer = _timer()
    _trainer(2, [timer]).fit(model, train_dataloaders=loader)
    return samples / timer.seconds[-1]


def write_summary_line(line: str) -> None:
    """Replace (or append) the ``end-to-end training stream`` line of benchmarks/RESULTS.md."""
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(rf"^{LINE}:.*$", re.M)
    if pattern.search(text):
        text = pattern.sub(line, text)
    else:
        text = text.rstrip("\n") + f"\n\n## Training throughput (benchmarks/train_throughput.py)\n\n{line}\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=6000, help="stamps per training epoch")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per backend (>= 2: the first is reported apart)")
    ap.add_argument("--backends", nargs="+", default=["galsim", "torch"], choices=sorted(VARIANTS))
    ap.add_argument("--override", nargs="*", default=[], help="more train.py overrides, e.g. data.num_workers=4")
    ap.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto: a GPU where there is one)")
    ap.add_argument("--out", default="benchmarks/RESULTS_train_throughput.md")
    args = ap.parse_args(argv)
    ACCELERATOR["name"] = args.accelerator
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first epoch includes the workers' start-up)")
    rows = []
    for backend in args.backends:
        r = stream_rate(backend, args.samples, args.epochs, args.override)
        rows.append(r)
        print(f"{backend:7s} first epoch {r['first_epoch']:7.0f} stamps/s, later epochs {r['later_epochs']:7.0f} "
              f"stamps/s ({r['num_workers']} workers, {r['train_threads']} training thread(s), batch "
              f"{r['batch_size']})", flush=True)
    ceiling = cnn_ceiling(max(args.samples, 10000), args.override)
    print(f"CNN alone (stamps in memory): {ceiling:.0f} stamps/s", flush=True)
    by = {r["backend"]: r for r in rows}
    md = ["# Training throughput", "", "```", machine_header(), f"torch threads {__import__('torch').get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f} at the end", "```", "",
          f"Command: `python benchmarks/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          "| backend | workers | training threads | batch | first epoch (stamps/s) | later epochs (stamps/s) | "
          "epoch wall times (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['backend']} | {r['num_workers']} | {r['train_threads']} | {r['batch_size']} | "
                  f"{r['first_epoch']:.0f} | "
                  f"{r['later_epochs']:.0f} | {', '.join(f'{s:.1f}' for s in r['epoch_s'])} |")
    md += ["", f"CNN alone on stamps in memory (same step, same batch): {ceiling:.0f} stamps/s"]
    if "galsim" in by and "torch" in by:
        t, g = by["torch"], by["galsim"]
        line = (f"{LINE}: torch {t['later_epochs']:.0f} stamps/s = {t['later_epochs'] / g['later_epochs']:.1f}x GalSim "
                f"({g['later_epochs']:.0f} stamps/s; first epochs {t['first_epoch']:.0f} vs {g['first_epoch']:.0f} = "
                f"{t['first_epoch'] / g['first_epoch']:.1f}x; CNN alone {ceiling:.0f}; "
                f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, `python benchmarks/train_throughput.py`)")
        md += ["", line]
        write_summary_line(line)
        print(line)
    (REPO / args.out).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
