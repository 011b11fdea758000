"""
LoRA (low-rank adapters) for the MMDiT: the 20B memory path, beside the learning path. train_fm.py --lora_rank
fine-tunes adapters only and exports them merged; train_dmd.py --fake_lora_rank puts the fake score on adapters
over the frozen teacher itself (the paper's fake score, §4.3: no second copy of the 20B weights; the toy and the
official code use a full copy). Imported only when one of those flags is set, and by sharded.py.

The base Linears keep their official names (`weight`, `bias`); the adapters add `lora_A` / `lora_B`, which
save_mmdit refuses until merge_lora folds them back.
"""
import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
import train_common as T


class LoRALinear(nn.Module):
    """y = x Wᵀ + b + (α/r)·x Aᵀ Bᵀ. Takes over a Linear's `weight`/`bias` (same names) and adds `lora_A/B`."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.scale, self.enabled = alpha / rank, True  # enabled=False: the base Linear alone (lora_off)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale if self.enabled else y


LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")  # the official LoRA experiments' set


def add_lora(model, rank, alpha, targets=LORA_TARGETS):
    """Wrap every Linear whose name ends in one of `targets`; freeze everything else. Returns the LoRA params."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(targets))]
    if not names:
        raise ValueError(f"no Linear matches the LoRA targets {list(targets)}")
    for n in names:
        parent, leaf = model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]
        parent._modules[leaf] = LoRALinear(parent._modules[leaf], rank, alpha)
    return [p for n, p in model.named_parameters() if ".lora_" in n]


@contextlib.contextmanager
def lora_off(model):
    """Run `model` as its base: every LoRALinear skips its adapter inside the block. DMD's LoRA fake score and the
    frozen teacher are then one module sharing the base tensors (no second copy of the 20B weights)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merge_lora(model):
    """Fold every LoRALinear back into a plain Linear (W += (α/r)·B A), leaving official keys only."""
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            lin = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight + m.scale * (m.lora_B @ m.lora_A).to(m.weight.dtype))
            lin.bias = m.bias
            parent, leaf = model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]
            parent._modules[leaf] = lin
    return model


def export_merged(dmodel, out, rank, r, alpha):
    """train_fm.py --lora_rank exports OUT/transformer: the base with the adapters merged in (official keys only);
    a sharded model is streamed, one tensor gathered at a time (sharded.export_sharded)."""
    if T.is_sharded(dmodel):
        import sharded

        return sharded.export_sharded(dmodel, os.path.join(out, "transformer"), "nanounipic-teacher-lora", rank)
    sd = T.full_state_dict(dmodel)
    if rank != 0:
        return
    with torch.device("meta"):
        m = M.MMDiT(T.unwrap(dmodel).cfg)
    add_lora(m, r, alpha)
    m.load_state_dict(sd, strict=True, assign=True)
    M.save_mmdit(merge_lora(m), os.path.join(out, "transformer"), name_or_path="nanounipic-teacher-lora")
