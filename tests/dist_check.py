"""Run by tests/test_train.py under `torchrun --nproc_per_node=2` (gloo, CPU): one global batch, three ways —
a single process on the whole batch, DDP and FSDP2 with half the batch per rank (two micro-steps each, so the
no-sync accumulation path runs too). Prints the largest differences; the test asserts on them."""
import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
import model as M  # noqa: E402
import train_common as T  # noqa: E402

rank, world, device = T.setup_dist()
torch.manual_seed(0)
base = M.MMDiT(M.PRESETS["tiny"]).init_weights()
with torch.no_grad():
    for p in base.parameters():
        p.add_(torch.randn_like(p) * 0.05)
T.freeze_unused(base)
shapes = [[(2, 3), (2, 2)], [(3, 3)], [(2, 2), (1, 3), (2, 1)], [(3, 2)]]
N = max(sum(h * w for h, w in s) for s in shapes)
x, noise = torch.randn(4, N, 64), torch.randn(4, N, 64)
txt, mask, t = torch.randn(4, 5, 64), torch.ones(4, 5, dtype=torch.bool), torch.rand(4)


def train(model, rows, steps=2):
    """`steps` AdamW steps; each step accumulates one micro-batch per row of `rows`."""
    opt = T.make_optimizer(model, 1e-3)
    for _ in range(steps):
        for k, r in enumerate(rows):
            with T.no_sync(model, last=k == len(rows) - 1):
                (T.fm_loss(model, x[r], [shapes[i] for i in r], txt[r], mask[r], t[r], noise[r]) / len(rows)).backward()  # DDP/FSDP2 average over ranks
        opt.step()
        opt.zero_grad()
    return T.full_state_dict(model)


def clone():
    m = M.MMDiT(base.cfg)
    m.load_state_dict(base.state_dict())
    T.freeze_unused(m)
    return m


# single process on the whole batch: the mean over 4 samples = the mean over ranks of two-micro-step means
single = clone()
opt = T.make_optimizer(single, 1e-3)
for _ in range(2):
    T.fm_loss(single, x, shapes, txt, mask, t, noise).backward()
    opt.step()
    opt.zero_grad()
ref = {k: v.detach() for k, v in single.state_dict().items()}
mine = [[2 * rank], [2 * rank + 1]]  # this rank's half, as two micro-batches of one sample
ddp = train(T.wrap(clone(), world, device), mine)
fsdp = train(T.wrap(clone(), world, device, fsdp=True), mine)
diff = lambda a, b: max((a[k].float() - b[k].float()).abs().max().item() for k in b)
gathered = [None] * world
dist.all_gather_object(gathered, {k: v.sum().item() for k, v in ddp.items()})
out = {"ddp_vs_single": diff(ddp, ref), "fsdp_vs_ddp": diff(fsdp, ddp) if rank == 0 else 0.0,  # gathered on rank 0
       "ranks_differ": max(abs(gathered[0][k] - gathered[1][k]) for k in gathered[0]),
       "moved": diff(ref, {k: v for k, v in base.state_dict().items()})}
if rank == 0:
    print("RESULT " + json.dumps(out))
T.cleanup_dist()
