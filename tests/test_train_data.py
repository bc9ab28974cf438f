"""Training data: chat records -> tokens with assistant-only targets, errors, batching of layouts."""

from __future__ import annotations

import json

import pytest
import torch

from maskspec.model.layout import IGNORE_INDEX, build_layout, default_block_heads, training_labels
from maskspec.train.data import (DataError, Example, assistant_mask, load_chat_records, make_batch, select_heads,
                                 tokenize_records)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from maskspec.hub import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("default"))


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "2 + 3 = 5."}]


def _spans(labelled):
    spans, start = [], None
    for i, flag in enumerate(list(labelled) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.slow  # the embedded model's tokenizer
def test_assistant_tokens_only(tokenizer):
    ids, labelled = assistant_mask(tokenizer, CHAT, [tokenizer.eos_token_id])
    assert ids == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    spans = _spans(labelled)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["Hello! How can I help?<|im_end|>",
                                                               "2 + 3 = 5.<|im_end|>"]
    # What precedes each span is exactly the generation prompt the model sees at inference.
    for (a, _), upto in zip(spans, (2, 4)):
        prompt = tokenizer.apply_chat_template(CHAT[:upto], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ids[:a]) == prompt


@pytest.mark.slow  # the embedded model's tokenizer
def test_load_records_and_truncation(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    long = {"id": "long", "messages": [{"role": "user", "content": "Tell me."},
                                       {"role": "assistant", "content": "word " * 200}]}
    short = {"id": "short", "messages": CHAT}
    none = {"id": "none", "messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}
    path.write_text("\n".join(json.dumps(r) for r in (long, short, none)) + "\n\n")
    records = load_chat_records(path)
    assert [r["id"] for _, r in records] == ["long", "short", "none"]
    assert records[0][0] == f"{path}:1"
    with pytest.warns(UserWarning, match="2 of 3 records .* truncated"):
        stats = tokenize_records(tokenizer, records, max_length=64, eos_token_ids=[tokenizer.eos_token_id])
    assert stats.truncated == 2  # 'long' and 'none' (its prompt alone fills the budget)
    assert [e.id for e in stats.examples] == ["long", "short"] and stats.dropped_no_target == 1
    assert all(e.input_ids.numel() <= 64 for e in stats.examples)
    assert stats.examples[0].labelled[-1]  # truncated inside the reply: targets up to the cut


@pytest.mark.slow  # the embedded model's tokenizer
def test_records_tokenized_in_chunks_equal_each_alone(tokenizer, monkeypatch):
    """tokenize_records encodes the renderings of many records per call: in chunks of any size, every example is
    what assistant_mask gives its record alone (one turn, two replies, a system prompt, a user turn after the last
    reply; in order)."""
    import maskspec.train.data as data

    chats = [CHAT, CHAT[1:3],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
             CHAT + [{"role": "user", "content": "Thanks."}]]
    records = [(f"r{i}", {"id": f"r{i}", "messages": chats[i % 4]}) for i in range(7)]
    alone = [assistant_mask(tokenizer, r["messages"], [tokenizer.eos_token_id]) for _, r in records]
    for chunk in (1, 3, 512):
        monkeypatch.setattr(data, "TOKENIZE_CHUNK", chunk)
        stats = tokenize_records(tokenizer, records, max_length=1024, eos_token_ids=[tokenizer.eos_token_id])
        assert [e.id for e in stats.examples] == [f"r{i}" for i in range(7)]
        for e, (ids, labelled) in zip(stats.examples, alone):
            assert e.input_ids.tolist() == ids and e.labelled.tolist() == labelled, (chunk, e.id)


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "messages": [', "d.jsonl:2: not valid JSON"),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
    ('{"id": 1}', "d.jsonl:2: record has no 'messages'"),
    ('{"messages": [{"role": "user"}]}', "d.jsonl:2: message 0 must be an object"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "d.jsonl:2: message 0 has unknown role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "d.jsonl:2: no assistant message"),
])
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": CHAT})
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        load_chat_records(path)


def test_datasets_data_files(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "part.json").write_text("\n".join(json.dumps({"id": str(i), "messages": CHAT}) for i in range(3)) + "\n")
    records = load_chat_records(folder)
    assert len(records) == 3 and records[0][1]["messages"] == CHAT
    import datasets
    import huggingface_hub

    # No network here: fail at once instead of retrying for half a minute.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset"):
        load_chat_records("no-such-owner/no-such-dataset-xyz")


def test_make_batch_layout_padding_and_targets():
    gen = torch.Generator().manual_seed(0)
    exs = []
    for n, prompt in ((9, 3), (14, 4)):
        ids = torch.randint(3, 100, (n,), generator=gen)
        labelled = torch.arange(n) >= prompt
        exs.append(Example(ids, labelled))
    k = 3
    batch = make_batch(exs, k, pad_token_id=0)
    rows = batch.token_ids.shape[1]
    for b, ex in enumerate(exs):
        layout = build_layout(ex.input_ids.numel(), default_block_heads(ex.labelled), k, normals_first=False)
        r = layout.rows
        assert torch.equal(batch.attention[b, :r, :r], layout.attention)
        assert torch.equal(batch.labels[b, :r], training_labels(layout, ex.input_ids, ex.labelled))
        # pad rows: see only themselves, no label, no LoRA, no partner; real rows never see pad rows
        pad = torch.arange(r, rows)
        assert torch.equal(batch.attention[b, r:, :], torch.eye(rows, dtype=torch.bool)[r:])
        assert not batch.attention[b, :r, r:].any()
        assert (batch.labels[b, pad] == IGNORE_INDEX).all() and (batch.mask_slot[b, pad] == -1).all()
        assert (batch.anchors[b, pad] == -1).all()
        for row in range(r):
            slot = int(layout.mask_slot[row])
            if slot < 0:
                assert batch.token_ids[b, row] == ex.input_ids[layout.normal_index[row]]
                continue
            h = int(layout.head[row])
            label = batch.labels[b, row]
            if label != IGNORE_INDEX:
                assert label == ex.input_ids[h + 1 + slot + 1]  # mask j=slot+1 predicts x_{h+1+j}
                assert batch.prev_ids[b, row] == ex.input_ids[h + slot + 1]  # the true token before the target
            partner = int(batch.anchors[b, row])
            if h + slot + 1 < ex.input_ids.numel():
                assert partner // rows == b
                p = partner % rows
                assert layout.normal_index[p] == h + slot + 1 and layout.position_ids[p] == layout.position_ids[row]
    assert batch.num_tokens == 23


def test_block_subset_is_seeded():
    heads = list(range(20))
    a = select_heads(heads, 0.25, None, torch.Generator().manual_seed(3))
    b = select_heads(heads, 0.25, None, torch.Generator().manual_seed(3))
    c = select_heads(heads, 0.25, None, torch.Generator().manual_seed(4))
    assert a == b == sorted(a) and len(a) == 5 and a != c
    assert len(select_heads(heads, 1.0, 3, torch.Generator().manual_seed(0))) == 3
    ex = Example(torch.arange(3, 40), torch.arange(37) >= 5)
    full = make_batch([ex], 2)
    part = make_batch([ex], 2, max_blocks=4, seeds=[11])
    assert int((part.mask_slot >= 0).sum()) == 8 < int((full.mask_slot >= 0).sum())
    assert torch.equal(make_batch([ex], 2, max_blocks=4, seeds=[11]).labels, part.labels)
