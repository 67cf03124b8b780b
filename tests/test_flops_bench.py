"""bench/flops.py's per-part FLOP attribution on a tiny SAK and the tiny reference: the parts add up to torch's
`FlopCounterMode` total, forward and backward land in their parts, and the low-resolution heads count fewer FLOPs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import TEACHERS, TINY_IMAGE_SIZE, nyud_labels, tiny_config


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from flops import PartFlopCounter, reference_loss, reference_parts, sak_parts  # noqa: E402
from reference_sak import RefMultiTaskModel  # noqa: E402
from speed import BILINEAR_FLOPS_PER_OUTPUT, flop_counter  # noqa: E402

from modeling_sak import SAKForMultiTask  # noqa: E402


def count_step(model, parts, loss_of) -> tuple[dict, int]:
    checked = flop_counter()
    with PartFlopCounter(parts) as counter, checked:
        loss_of().backward()
    assert counter.total == checked.get_total_flops()
    return dict(counter.counts), counter.total


def test_parts_add_up_and_the_low_resolution_heads_count_fewer_flops():
    pixel_values = torch.randn(2, 3, *TINY_IMAGE_SIZE)
    labels = nyud_labels(2, *TINY_IMAGE_SIZE)
    teacher_features = {name: [torch.randn(2, 32, 4, 6) for _ in range(4)] for name in TEACHERS}
    counts = {}
    for implementation in ("plain", "low_resolution"):
        torch.manual_seed(0)
        model = SAKForMultiTask(tiny_config(head_implementation=implementation)).train()
        step = lambda model=model: model(pixel_values, labels=labels, teacher_features=teacher_features).loss  # noqa: E731
        counts[implementation], _ = count_step(model, sak_parts(model), step)
    for part in ("stem", "adapter_paths", "routers", "heads"):
        assert counts["plain"][part] > 0, part
        if part != "heads":
            assert counts["low_resolution"][part] == counts["plain"][part], part
    assert counts["low_resolution"]["heads"] < counts["plain"]["heads"]

    config = tiny_config(head_implementation="plain")
    reference = RefMultiTaskModel(
        TINY_IMAGE_SIZE,
        dict(config.tasks),
        dim=32,
        depth=4,
        heads=2,
        hidden=64,
        tea_dims=dict.fromkeys(TEACHERS, 32),
        out_indices=config.out_indices,
    ).train()
    reference_counts, _ = count_step(
        reference,
        reference_parts(reference),
        lambda: reference_loss(reference, config, pixel_values, labels, teacher_features),
    )
    # The same architecture: the reference's heads count what SAK's plain heads count, forward and backward, except the
    # final resize to the input size, which the reference runs outside its heads.
    final_resize = (
        2 * BILINEAR_FLOPS_PER_OUTPUT * 2 * sum(config.tasks.values()) * TINY_IMAGE_SIZE[0] * TINY_IMAGE_SIZE[1]
    )
    assert reference_counts["heads"] + final_resize == counts["plain"]["heads"]
    assert reference_counts["routers"] == counts["plain"]["routers"]
