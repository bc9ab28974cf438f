"""The layout rule on small hand-written tables."""

import torch

from maskspec.model.layout import (IGNORE_INDEX, apply_sliding_window, build_layout, consistency_anchor_rows,
                                   default_block_heads, training_labels)


def test_method_table_k2_reproduced_exactly():
    # method.md §3: prompt p0..p3, response r0..r3, k = 2.
    ids = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23])  # p0..p3, r0..r3
    labelled = torch.tensor([False] * 4 + [True] * 4)
    heads = default_block_heads(labelled)
    assert heads == [3, 4, 5]
    layout = build_layout(8, heads, 2)
    names = ["p0", "p1", "p2", "p3", "M1", "M2", "r0", "M1", "M2", "r1", "M1", "M2", "r2", "r3"]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 5, 6, 7, 6, 7]
    assert layout.gate.int().tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0]
    labels = training_labels(layout, ids, labelled).tolist()
    r0, r1, r2, r3, no = 20, 21, 22, 23, IGNORE_INDEX
    assert labels == [no, no, no, r0, r1, r2, r1, r2, r3, r2, r3, no, r3, no]
    assert len(names) == layout.rows


def test_attention_rule_table():
    layout = build_layout(3, [0, 1], 2)  # x0 M M x1 M M x2
    a = layout.attention.int().tolist()
    assert a == [
        [1, 0, 0, 0, 0, 0, 0],  # x0
        [1, 1, 0, 0, 0, 0, 0],  # M1 of x0: x0 and itself
        [1, 1, 1, 0, 0, 0, 0],  # M2 of x0: x0, M1, itself
        [1, 0, 0, 1, 0, 0, 0],  # x1: normal tokens only
        [1, 0, 0, 1, 1, 0, 0],  # M1 of x1: never the other block's masks
        [1, 0, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 0, 0, 1],  # x2
    ]


def test_normals_first_with_past_is_the_same_rule_reordered():
    inter = build_layout(3, [0, 1, 2], 2, past_length=4)
    first = build_layout(3, [0, 1, 2], 2, past_length=4, normals_first=True)
    assert first.gate[:3].tolist() == [False] * 3 and first.gate[3:].all()
    # Map each row of one layout to the other by (head, slot) and compare positions and attention.
    key = lambda lay: [(int(h), int(s)) for h, s in zip(lay.head, lay.mask_slot)]  # noqa: E731
    order = [key(inter).index(k) for k in key(first)]
    assert torch.equal(inter.position_ids[order], first.position_ids)
    perm = torch.tensor(order)
    inter_att = inter.attention[perm][:, torch.cat([torch.arange(4), 4 + perm])]
    assert torch.equal(inter_att, first.attention)
    assert first.attention[:, :4].all()  # every row sees the cached past
    assert first.position_ids[:3].tolist() == [4, 5, 6]


def test_block_rows_and_anchor_rows():
    layout = build_layout(4, [0, 2], 3, normals_first=True)
    rows = layout.block_rows(2)
    assert layout.mask_slot[rows].tolist() == [0, 1, 2]
    assert (layout.head[rows] == 2).all()
    anchors = consistency_anchor_rows(layout)
    # Mask j of head h pairs with normal token h + j (same position, same target), if it exists.
    for row in range(layout.rows):
        if layout.gate[row]:
            partner = int(layout.head[row] + layout.mask_slot[row] + 1)
            if partner < 4:
                assert layout.normal_index[anchors[row]] == partner
                assert layout.position_ids[anchors[row]] == layout.position_ids[row]
            else:
                assert anchors[row] == -1
        else:
            assert anchors[row] == -1


def test_sliding_window_rule():
    layout = build_layout(6, [4], 2)
    windowed = apply_sliding_window(layout.attention, layout.position_ids, layout.key_positions, window=3)
    q = layout.position_ids[:, None]
    kpos = layout.key_positions[None, :]
    assert not (windowed & (q - kpos >= 3)).any()
    assert torch.equal(windowed, layout.attention & (q - kpos < 3))
    assert windowed[5, 3] and not windowed[5, 2]  # x5 (pos 5) sees pos 3 but not pos 2


def test_pad_rows_see_only_themselves_in_training_batches_and_decoding_steps():
    from maskspec.model.layout import pad_rows_attention
    from maskspec.train.data import Example, make_batch

    assert torch.equal(pad_rows_attention(3), torch.eye(3, dtype=torch.bool))
    short = Example(torch.tensor([5, 6, 7]), torch.tensor([False, True, True]))
    long = Example(torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([False, True, True, True, True, True]))
    batch = make_batch([short, long], k=2)
    r = int((batch.position_ids[0] != 0).sum()) + 1  # the short example's real rows (position 0 is its first)
    att = batch.attention[0]
    assert att[r:, r:].equal(pad_rows_attention(att.shape[0] - r))
    assert not att[r:, :r].any() and not att[:r, r:].any()
    assert att.any(dim=-1).all()  # no row of the matrix is all False


def test_tree_attention_and_positions_table():
    # y0 with two children (a, b); a has a child c. A block of k=2 after c and after b. Normals first.
    #        y0(0)
    #       /     \
    #    a(1)     b(2)
    #     |
    #    c(3)
    layout = build_layout(4, [3, 2], 2, parents=[-1, 0, 0, 1], normals_first=True, past_length=2)
    assert layout.position_ids.tolist() == [2, 3, 3, 4, 4, 5, 5, 6]  # y0 a b c | M1 M2 (b) | M1 M2 (c)
    a = layout.attention[:, 2:].int().tolist()  # without the 2 cached columns (all visible)
    assert a == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # y0
        [1, 1, 0, 0, 0, 0, 0, 0],  # a: y0 and itself
        [1, 0, 1, 0, 0, 0, 0, 0],  # b: never its sibling a
        [1, 1, 0, 1, 0, 0, 0, 0],  # c: its path y0 a c
        [1, 0, 1, 0, 1, 0, 0, 0],  # M1 of b: b's path
        [1, 0, 1, 0, 1, 1, 0, 0],  # M2 of b
        [1, 1, 0, 1, 0, 0, 1, 0],  # M1 of c: c's path, not b's block
        [1, 1, 0, 1, 0, 0, 1, 1],
    ]
    assert layout.attention[:, :2].all()
    chain = build_layout(4, [3, 2], 2, normals_first=True, past_length=2)
    assert torch.equal(build_layout(4, [3, 2], 2, parents=[-1, 0, 1, 2], normals_first=True, past_length=2)
                       .attention, chain.attention)  # a chain given as parents is the chain


def test_tree_parents_are_checked():
    import pytest

    with pytest.raises(ValueError, match="earlier node"):
        build_layout(3, [], 1, parents=[-1, 2, 0])
    with pytest.raises(ValueError, match="one entry per normal token"):
        build_layout(3, [], 1, parents=[-1, 0])
