"""A transcription of the SparseGPT reference code, to check ops/prune.py's SparseGPT against it
(tests/test_real_model.py). Test code only: the product never imports it.

Source: IST-DASLab/sparsegpt (https://github.com/IST-DASLab/sparsegpt), commit 5e3e2d19 of
`sparsegpt.py` (class SparseGPT: add_batch, fasterprune) and commit 800a6881 of `llama.py`
(llama_sequential). Transcribed line by line, with only these changes:
- nn.Linear only (the Conv1D / Conv2d reshapes and the quantizer are left out);
- no prints, no torch.cuda.synchronize (CPU);
- llama_sequential takes the calibration batches and runs on the model's device; the decoder
  layers of transformers 5 take their rotary embeddings and positions as keyword arguments,
  so the catcher keeps every keyword argument (the reference keeps `attention_mask` only,
  which was all its transformers version passed);
- the default `sequential = [list(full.keys())]` (the reference's default, without
  --true-sequential): every linear of a layer gets its Hessian from the same pass of the
  layer's dense inputs, all are pruned, then the pruned layer's outputs feed the next layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class SparseGPT:

    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out, blocksize=1024):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
        W = self.layer.weight.data.clone()
        W = W.float()

        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        Losses = torch.zeros(self.rows, device=self.dev)

        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H

        mask = None

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1

            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            if prunen == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]

                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

                q = w.clone()
                q[mask1[:, i]] = 0

                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d ** 2

                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2

            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        self.error = torch.sum(Losses).item()
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)

    def free(self):
        self.H = None


def find_layers(module, layers=(nn.Linear,), name=''):
    """modelutils.find_layers: the named linears of a module."""
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + '.' + name1 if name != '' else name1))
    return res


@torch.no_grad()
def llama_sequential(model, batches, sparsity=0.5, prunen=0, prunem=0, percdamp=.01,
                     blocksize=128, on_layer=None):
    """llama.py's llama_sequential on `batches` (a list of (B, T) token-id tensors; the
    reference's dataloader gives (1, T) samples: they are split into rows here).
    on_layer(i, layer, gpts) is called after layer i is pruned (for layer-by-layer checks)."""
    dev = next(model.parameters()).device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers

    samples = [row.unsqueeze(0) for b in batches for row in b]
    inps = [None] * len(samples)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in samples:
        try:
            model(batch.to(dev))
        except ValueError:
            pass
    layers[0] = layers[0].module
    kwargs = {k: v for k, v in cache["kwargs"].items() if k != "past_key_values"}
    kwargs["use_cache"] = False

    def run(layer, x):
        y = layer(x, **kwargs)
        return y[0] if isinstance(y, tuple) else y

    outs = [None] * len(samples)
    for i in range(len(layers)):
        layer = layers[i]
        full = find_layers(layer)
        sequential = [list(full.keys())]

        for names in sequential:
            subset = {n: full[n] for n in names}

            gpts = {}
            for name in subset:
                gpts[name] = SparseGPT(subset[name])

            def add_batch(name):
                def tmp(_, inp, out):
                    gpts[name].add_batch(inp[0].data, out.data)
                return tmp

            handles = []
            for name in subset:
                handles.append(subset[name].register_forward_hook(add_batch(name)))
            for j in range(len(samples)):
                outs[j] = run(layer, inps[j])
            for h in handles:
                h.remove()

            for name in subset:
                gpts[name].fasterprune(sparsity, prunen=prunen, prunem=prunem,
                                       percdamp=percdamp, blocksize=blocksize)
                gpts[name].free()
            if on_layer is not None:
                on_layer(i, layer, gpts)

        for j in range(len(samples)):
            outs[j] = run(layer, inps[j])

        inps, outs = outs, inps

    model.config.use_cache = use_cache
