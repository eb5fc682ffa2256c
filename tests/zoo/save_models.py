"""What a user does, run as a script in their own project folder (not by torchslim):
import the model from its module, train it a little on their data, ``torch.save(model)``.

    python save_models.py resnet vgg ...   # writes resnet.pt, vgg.pt, ... here

Each module declares DATA (the .npz to train on: DATA-train.npz), EPOCHS and optionally LR;
the models are
saved as full pickles, so loading them needs the module importable again.
"""

import importlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def load(kind):
    with np.load(f"{kind}-train.npz") as f:
        names = ["x"] if "x" in f.files else sorted(n for n in f.files if n.startswith("x"))
        return [torch.from_numpy(f[n]) for n in names], torch.from_numpy(f["y"])


def train(model, xs, y, epochs, lr=3e-3, batch=32):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(y) // batch))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(*(x[idx] for x in xs)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return (model(*xs).argmax(1) == y).float().mean().item()


def main(names):
    torch.set_num_threads(1)  # tiny models: a second thread only waits (and varies results)
    for name in names:
        start = time.perf_counter()
        module = importlib.import_module(name)
        torch.manual_seed(0)
        model = module.build()
        lr = getattr(module, "LR", 3e-3)
        acc = train(model, *load(module.DATA), module.EPOCHS, lr) if module.EPOCHS else None
        torch.save(model.eval(), f"{name}.pt")
        print(f"{name}: train top-1 {acc}, {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
