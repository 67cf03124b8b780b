"""An independent re-statement of the reference SAK model, used as the test oracle.

It follows the reference implementation's module structure and state-dict names (timm ViT names, `tsap`,
`out_norms`, `ts_aligners`, `mor`, `heads.{task}.linears/linear_fuse/last_conv`) and its forward order, written
from DESIGN.md section 2/4 without sharing any code with `modeling_sak`, so that the converter and the model are
checked against something they did not produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 16, 16)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    num_prefix_tokens = 1

    def __init__(self, img_size, dim, depth, heads, hidden):
        super().__init__()
        self.embed_dim = dim
        self.patch_embed = RefPatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (img_size[0] // 16) * (img_size[1] // 16), dim) * 0.02)
        self.blocks = nn.ModuleList(RefBlock(dim, heads, hidden) for _ in range(depth))

    def embed(self, x):
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


class RefAdapter(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.down = nn.Linear(dim, dim // ratio)
        self.up = nn.Linear(dim // ratio, dim)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.up(F.gelu(self.down(x))) * self.scale + x


class RefGlobalRouter(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.module = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.LayerNorm(dim // 2), nn.GELU(), nn.Linear(dim // 2, out)
        )

    def forward(self, x):
        return self.module(x).mean(dim=1)


class RefMoR(nn.Module):
    def __init__(self, dim: int, teachers: list[str], noisy: bool):
        super().__init__()
        self.teachers, self.noisy = teachers, noisy
        self.router = RefGlobalRouter(dim, (len(teachers) + 1) * (2 if noisy else 1))

    def forward(self, vit_tokens, student_tokens, hw):
        logits = self.router(vit_tokens)
        if self.noisy:
            clean, raw = logits.chunk(2, dim=1)
            logits = clean + torch.randn_like(clean) * (F.softplus(raw) + 1e-2) if self.training else clean
        probs = logits.softmax(dim=1)
        b = vit_tokens.shape[0]
        maps = [vit_tokens] + [student_tokens[t] for t in self.teachers]
        maps = torch.stack([m.reshape(b, *hw, -1).permute(0, 3, 1, 2) for m in maps], dim=1)
        return (maps * probs[:, :, None, None, None]).sum(dim=1)


class RefSAKBackbone(nn.Module):
    def __init__(
        self,
        img_size,
        dim,
        depth,
        heads,
        hidden,
        tea_dims,
        out_indices,
        tasks,
        ratio=4,
        aligner=False,
        router_type="mor",
        noisy=True,
    ):
        super().__init__()
        self.vit = RefViT(img_size, dim, depth, heads, hidden)
        self.out_indices, self.tasks, self.teachers = out_indices, tasks, list(tea_dims)
        self.hw = (img_size[0] // 16, img_size[1] // 16)
        self.tsap = nn.ModuleDict(
            {t: nn.ModuleList(RefAdapter(dim, ratio) for _ in range(depth + 1)) for t in tea_dims}
        )
        self.out_norms = nn.ModuleDict({f"{i}_{t}": nn.LayerNorm(dim) for i in out_indices for t in tea_dims})
        self.ts_aligners = (
            nn.ModuleDict({f"{i}_{t}": nn.Linear(dim, d) for i in out_indices for t, d in tea_dims.items()})
            if aligner
            else None
        )
        self.mor = (
            nn.ModuleDict({f"{i}_{k}": RefMoR(dim, self.teachers, noisy) for i in out_indices for k in tasks})
            if tasks and router_type == "mor"
            else None
        )

    def forward(self, x):
        b = x.shape[0]
        x = self.vit.embed(x)
        residuals = {t: self.tsap[t][0](x) for t in self.teachers}
        aligned = {t: [] for t in self.teachers}
        task_feats = {k: [] for k in self.tasks}
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            for t in self.teachers:
                residuals[t] = self.tsap[t][i + 1](residuals[t] + x)
            if i not in self.out_indices:
                continue
            students = {t: self.out_norms[f"{i}_{t}"](residuals[t][:, 1:]) for t in self.teachers}
            for t in self.teachers:
                feat = self.ts_aligners[f"{i}_{t}"](students[t]) if self.ts_aligners is not None else students[t]
                aligned[t].append(feat.reshape(b, *self.hw, -1).permute(0, 3, 1, 2))
            vit_tokens = x[:, 1:]
            if self.mor is not None:
                for k in self.tasks:
                    task_feats[k].append(self.mor[f"{i}_{k}"](vit_tokens, students, self.hw))
            else:
                total = vit_tokens + sum(students[t] for t in self.teachers)
                for k in self.tasks:
                    task_feats[k].append(total.reshape(b, *self.hw, -1).permute(0, 3, 1, 2))
        return aligned, task_feats


class RefDecodeHead(nn.Module):
    def __init__(self, dim: int, out: int, img_size):
        super().__init__()
        self.opr_size = (img_size[0] // 4, img_size[1] // 4)
        self.linears = nn.ModuleList(nn.Linear(dim, dim // 4) for _ in range(4))
        self.linear_fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.GELU())
        self.last_conv = nn.Conv2d(dim, out, 1)

    def forward(self, feats):
        maps = []
        for linear, feat in zip(self.linears, feats):
            b, c, h, w = feat.shape
            proj = linear(feat.flatten(2).transpose(1, 2)).permute(0, 2, 1).reshape(b, -1, h, w)
            maps.append(F.interpolate(proj, size=self.opr_size, mode="bilinear", align_corners=False))
        return self.last_conv(self.linear_fuse(torch.cat(maps, dim=1)))


class RefMultiTaskModel(nn.Module):
    """Stage-2 model: `backbone.*` + `heads.*`."""

    def __init__(self, img_size, tasks: dict[str, int], **backbone_kwargs):
        super().__init__()
        self.backbone = RefSAKBackbone(img_size, tasks=list(tasks), **backbone_kwargs)
        self.heads = nn.ModuleDict({k: RefDecodeHead(backbone_kwargs["dim"], n, img_size) for k, n in tasks.items()})

    def forward(self, x):
        aligned, task_feats = self.backbone(x)
        outputs = {k: F.interpolate(self.heads[k](task_feats[k]), x.shape[-2:], mode="bilinear") for k in self.heads}
        return aligned, outputs


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic a non-trivial random value so that no mapping error can hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var") or name.endswith(".scale"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model
