"""RLVMR (card adv#B29): episode advantage + w x tag-normalised step advantage."""

from __future__ import annotations

import torch

from tether.catalogue import get

rlvmr = get("advantage", "rlvmr").fn
D = torch.float64


def test_untagged_tokens_get_only_the_episode_advantage() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    ids = torch.zeros(4, dtype=torch.long)
    mask = torch.ones(4, 5, dtype=torch.bool)
    tags = torch.zeros(4, 5, dtype=torch.long)
    tags[0, 1:3] = 1
    tags[2, 0:2] = 1
    step = torch.zeros(4, 5, dtype=D)
    step[0, 1:3] = 1.0
    out, _ = rlvmr(r, ids, mask, tags, step)
    a_ep = (r - r.mean()) / (r.std() + 1e-6)
    assert torch.allclose(out[tags == 0], a_ep.unsqueeze(-1).expand(4, 5)[tags == 0])
    # planning steps: rewards [1, 0] -> normalised +-1/sqrt(2)*... ; w = 0.5
    s = torch.tensor([1.0, 0.0], dtype=D)
    a_tag = (s - s.mean()) / (s.std() + 1e-6)
    assert torch.allclose(out[0, 1:3], a_ep[0] + 0.5 * a_tag[0])
    assert torch.allclose(out[2, 0:2], a_ep[2] + 0.5 * a_tag[1])


def test_normalisation_is_per_group_and_tag() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=D)
    ids = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 4, dtype=torch.bool)
    tags = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]])
    step = torch.tensor(
        [[1.0, 1.0, 5.0, 5.0], [0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=D
    )
    out, m = rlvmr(r, ids, mask, tags, step, norm="mean")
    a_ep = torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=D)
    expected = torch.tensor(
        [
            [0.5 + 0.5 * 0.5, 0.75, 0.5 + 0.5 * 2.0, 1.5],
            [-0.5 - 0.25, -0.75, -0.5 - 1.0, -1.5],
            [0.5 + 0.5 * 1.0, 1.0, 0.5, 0.5],
            [-0.5 - 0.5, -1.0, -0.5, -0.5],
        ],
        dtype=D,
    )
    assert torch.allclose(out, expected)
    assert torch.allclose(out[:, 3], torch.tensor([1.5, -1.5, 0.5, -0.5], dtype=D))
    assert m["rlvmr/num_steps"].item() == 6
    assert a_ep.sum() == 0


def test_two_steps_in_one_row_and_padding() -> None:
    r = torch.tensor([1.0, 0.0], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    tags = torch.tensor([[2, 0, 2, 2, 2], [2, 2, 2, 2, 2]])
    step = torch.tensor([[1.0, 0.0, 0.0, 0.0, 9.0], [0.5, 0.5, 0.5, 7.0, 7.0]], dtype=D)
    out, m = rlvmr(r, torch.zeros(2, dtype=torch.long), mask, tags, step, norm="mean")
    assert m["rlvmr/num_steps"].item() == 3  # padding splits nothing and is never a step
    assert out[0, 4] == 0 and out[1, 3] == 0
    mean_step = (1.0 + 0.0 + 0.5) / 3
    assert out[0, 0].item() == 0.5 + 0.5 * (1.0 - mean_step)
    assert out[0, 2].item() == 0.5 + 0.5 * (0.0 - mean_step)
