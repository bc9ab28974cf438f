"""Aggregation, answer checking, suites and tables of `maskspec bench`, on synthetic records (no model)."""

from __future__ import annotations

import json
import math

import pytest

from maskspec.bench.report import (aggregate, answer_correct, extract_last_number, first_difference, speed_table,
                                   tau_table, write_plots, write_report_md, write_results_json)
from maskspec.bench.runner import Method, RunRecord, build_methods, truncate_at_eos
from maskspec.bench.suites import BUILTIN_SUITE, load_suite, select_prompts
from maskspec.errors import MaskspecError


def rec(prompt_id, domain, method, tokens, passes, seconds, mode=None, k=None, repeat=0, text="", reference=None):
    return RunRecord(prompt_id=prompt_id, domain=domain, method=method, mode=mode, k=k, repeat=repeat,
                     new_tokens=len(tokens), forward_passes=passes, seconds=seconds, token_ids=list(tokens),
                     text=text, reference=reference)


def q2(prompt_id, domain, tokens, passes, seconds, **kw):
    return rec(prompt_id, domain, "maskspec", tokens, passes, seconds, mode="quadratic", k=2, **kw)


@pytest.fixture
def records():
    return [
        rec("p1", "math", "hf", [1, 2, 3, 4], 4, 2.0, text="so 4", reference="4"),
        q2("p1", "math", [1, 2, 3, 4], 2, 1.0, text="so 4", reference="4"),
        rec("p1", "math", "hf-prompt-lookup", [1, 2, 3, 4], None, 1.0, text="so 4", reference="4"),
        rec("p2", "math", "hf", [5, 6], 2, 1.0, text="6 apples", reference="10"),
        q2("p2", "math", [5, 6], 1, 0.5, text="6 apples", reference="10"),
        rec("p2", "math", "hf-prompt-lookup", [5, 6], 2, 1.0, text="6 apples", reference="10"),
        rec("p3", "code", "hf", [7, 8, 9, 10, 11, 12], 6, 3.0),
        q2("p3", "code", [7, 8, 9, 0, 11, 12], 3, 1.0),
        rec("p3", "code", "hf-prompt-lookup", [7, 8, 9, 10, 11, 12], 3, 2.0),
    ]


def row(rows, domain, method):
    (match,) = [r for r in rows if r["domain"] == domain and r["label"] == method]
    return match


def test_aggregate_tau_speedup_exact_match(records):
    rows, mismatches = aggregate(records)
    assert [(r["domain"], r["label"]) for r in rows] == [
        ("math", "hf"), ("math", "quadratic k=2"), ("math", "hf-prompt-lookup"),
        ("code", "hf"), ("code", "quadratic k=2"), ("code", "hf-prompt-lookup"),
        ("all", "hf"), ("all", "quadratic k=2"), ("all", "hf-prompt-lookup")]

    hf = row(rows, "math", "hf")
    assert (hf["prompts"], hf["new_tokens"], hf["forward_passes"]) == (2, 6, 6)
    assert hf["tokens_per_pass"] == 1.0
    assert hf["tokens_per_second"] == 2.0
    assert hf["speedup_vs_hf"] == 1.0 and hf["exact_match"] == 1.0

    q = row(rows, "math", "quadratic k=2")
    assert (q["method"], q["mode"], q["k"]) == ("maskspec", "quadratic", 2)
    assert (q["new_tokens"], q["forward_passes"]) == (6, 3)
    assert q["tokens_per_pass"] == 2.0
    assert q["tokens_per_second"] == 4.0
    assert q["ms_per_pass"] == 1000 * 1.5 / 3 and hf["ms_per_pass"] == 1000 * 3.0 / 6  # seconds over passes
    assert q["speedup_vs_hf"] == 2.0
    assert q["exact_match"] == 1.0

    code = row(rows, "code", "quadratic k=2")
    assert code["tokens_per_pass"] == 2.0
    assert code["speedup_vs_hf"] == 3.0
    assert code["exact_match"] == 0.0

    total = row(rows, "all", "quadratic k=2")
    assert (total["prompts"], total["new_tokens"], total["forward_passes"]) == (3, 12, 6)
    assert total["tokens_per_second"] == 12 / 2.5
    assert total["speedup_vs_hf"] == pytest.approx((12 / 2.5) / (12 / 6.0))
    assert total["exact_match"] == pytest.approx(2 / 3)

    # A method whose passes are unknown for one prompt has no pass count or tau for the pooled rows.
    lookup_math = row(rows, "math", "hf-prompt-lookup")
    assert lookup_math["forward_passes"] is None and lookup_math["tokens_per_pass"] is None
    assert lookup_math["speedup_vs_hf"] == 1.5
    lookup_code = row(rows, "code", "hf-prompt-lookup")
    assert lookup_code["forward_passes"] == 3 and lookup_code["tokens_per_pass"] == 2.0

    assert mismatches == [{"prompt_id": "p3", "domain": "code", "method": "maskspec", "mode": "quadratic", "k": 2,
                           "tree": 0, "static": False, "label": "quadratic k=2", "repeat": 0, "first_difference": 3, "new_tokens": 6,
                           "baseline_new_tokens": 6, "matches_ar": None}]
    assert row(rows, "code", "quadratic k=2")["exact_match_vs_ar"] is None  # mode ar did not run


def test_aggregate_accuracy(records):
    rows, _ = aggregate(records)
    assert row(rows, "math", "hf")["accuracy"] == 0.5
    assert row(rows, "math", "hf")["accuracy_prompts"] == 2
    assert row(rows, "code", "hf")["accuracy"] is None
    assert row(rows, "all", "quadratic k=2")["accuracy"] == 0.5


def test_aggregate_repeats_mean_and_spread():
    records = [
        rec("p", "chat", "hf", [1, 2], 2, 1.0, repeat=0), rec("p", "chat", "hf", [1, 2], 2, 2.0, repeat=1),
        q2("p", "chat", [1, 2], 1, 0.5, repeat=0), q2("p", "chat", [1, 2], 1, 0.5, repeat=1),
    ]
    rows, mismatches = aggregate(records)
    q = row(rows, "chat", "quadratic k=2")
    assert q["repeats"] == 2 and q["new_tokens"] == 2 and q["forward_passes"] == 1
    assert q["tokens_per_second"] == 4.0 and q["tokens_per_second_std"] == 0.0
    assert q["speedup_vs_hf"] == 3.0  # repeat 0: 4/2, repeat 1: 4/1
    assert q["speedup_vs_hf_std"] == pytest.approx(math.sqrt(2))
    assert (q["speedup_vs_hf_min"], q["speedup_vs_hf_max"]) == (2.0, 4.0)
    hf = row(rows, "chat", "hf")
    assert hf["tokens_per_second"] == 1.5 and hf["tokens_per_second_std"] == pytest.approx(math.sqrt(0.5))
    assert mismatches == []


def test_exact_match_vs_reference_loop():
    """A mismatch against hf that mode ar shares is numerics of the forward; one ar does not share is drafting."""
    records = [
        rec("p", "chat", "hf", [1, 2, 3], 3, 1.0), rec("p", "chat", "ar", [1, 2, 9], 3, 1.0, mode="ar"),
        q2("p", "chat", [1, 2, 9], 2, 1.0), rec("p", "chat", "maskspec", [1, 5, 9], 2, 1.0, mode="linear", k=2),
    ]
    rows, mismatches = aggregate(records)
    assert [(r["label"], r["exact_match"], r["exact_match_vs_ar"]) for r in rows if r["domain"] == "chat"] == [
        ("hf", 1.0, None), ("ar", 0.0, 1.0), ("quadratic k=2", 0.0, 1.0), ("linear k=2", 0.0, 0.0)]
    assert [(m["label"], m["first_difference"], m["matches_ar"]) for m in mismatches] == [
        ("ar", 2, None), ("quadratic k=2", 2, True), ("linear k=2", 1, False)]


def test_sampling_has_no_exact_match_or_mismatches(records):
    rows, mismatches = aggregate(records, greedy=False)
    assert row(rows, "code", "quadratic k=2")["exact_match"] is None
    assert row(rows, "code", "hf")["exact_match"] == 1.0
    assert mismatches == []


def test_tables_and_files(records, tmp_path):
    rows, mismatches = aggregate(records)
    title, headers, body = tau_table(rows)
    assert headers == ["domain", "k=2"]
    assert body == [["math", "2.00"], ["code", "2.00"], ["all", "2.00"]]
    _, headers, body = speed_table(rows)
    assert headers == ["method", "math", "code", "all"]
    assert body[1][0] == "quadratic k=2" and body[1][1] == "4.0 tok/s (2.00x)"
    config = {"model": "m", "adapter": "a", "max_new_tokens": 4, "temperature": 0.0, "repeats": 1}
    system = {"device": "cpu", "cpu": "x", "dtype": "float32"}
    write_results_json(tmp_path / "results.json", rows, mismatches, system, config)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload) == {"system", "config", "results", "mismatches"}
    plots = write_plots(tmp_path, rows)
    assert [p.name for p in plots] == ["tau_vs_k.png", "speedup.png"]
    md = write_report_md(tmp_path / "report.md", rows, mismatches, system, config, plots=[str(p) for p in plots])
    text = md.read_text()
    assert "| math | 2.00 |" in text and "p3" in text and "![speedup](speedup.png)" in text
    assert tau_table([r for r in rows if r["method"] != "maskspec"]) is None


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42.0), ("costs $1,234.50 in total", 1234.5), ("from -3 to 7, so 7", 7.0),
    ("no numbers here", None), ("", None), ("12 apples and 3.5 pears", 3.5), ("#### 18", 18.0),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_answer_correct():
    assert answer_correct("So she pays $45.", "45") is True
    assert answer_correct("She pays 45.00 dollars", "45") is True
    assert answer_correct("So 44", "45") is False
    assert answer_correct("anything", None) is None
    assert answer_correct("anything", "Canberra") is None


def test_helpers():
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert truncate_at_eos([5, 2, 7, 2], [2]) == [5, 2]
    assert truncate_at_eos([5, 6], [2]) == [5, 6]
    methods, skipped = build_methods(["ar", "quadratic", "linear"], [1, 2, 4], ["hf", "hf-prompt-lookup"], max_k=2)
    assert [m.label for m in methods] == ["hf", "hf-prompt-lookup", "ar", "quadratic k=1", "quadratic k=2",
                                          "linear k=1", "linear k=2"]
    assert skipped == [4]
    methods, _ = build_methods(["ar", "quadratic"], [1, 2], ["hf"], max_k=None)
    assert methods == [Method("hf"), Method("ar", "ar", None)]
    methods, _ = build_methods(["ar", "quadratic", "linear"], [2], ["hf", "hf-static"], max_k=2, trees=[0, 4],
                               static=True)
    assert [m.label for m in methods] == ["hf", "hf-static", "ar", "ar static", "quadratic k=2",
                                          "quadratic k=2 static", "quadratic k=2 tree=4",
                                          "quadratic k=2 tree=4 static", "linear k=2"]
    assert len({m.key for m in methods}) == len(methods)


def test_builtin_suite():
    prompts = load_suite()
    assert len(prompts) == 15
    assert {p.domain for p in prompts} == {"knowledge", "math", "code", "chat", "safety"}
    assert all(p.reference is not None for p in prompts if p.domain == "math")
    picked = select_prompts(prompts, ["math", "code"], 2)
    assert [p.domain for p in picked] == ["math", "math", "code", "code"]
    with pytest.raises(MaskspecError, match="not in the suite"):
        select_prompts(prompts, ["poetry"])


def test_suite_formats_and_errors(tmp_path):
    spec = tmp_path / "question.jsonl"
    spec.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Again."]})
                    + "\n\n" + json.dumps({"question_id": 82, "category": "qa", "turns": ["Why?"]}) + "\n")
    prompts = load_suite(spec)
    assert [(p.id, p.domain, p.messages) for p in prompts] == [
        ("81", "writing", [{"role": "user", "content": "Write a haiku."}]),
        ("82", "qa", [{"role": "user", "content": "Why?"}])]

    bad_cases = {
        "{not json": "invalid JSON",
        "[1, 2]": "expected a JSON object",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}): "'domain'",
        json.dumps({"domain": "chat", "messages": "hi"}): "'messages'",
        json.dumps({"domain": "chat", "messages": [{"role": "user"}]}): "message 0",
        json.dumps({"category": "qa", "turns": []}): "'turns'",
        json.dumps({"prompt": "hi"}): "needs 'domain'",
    }
    good = json.dumps({"id": "a", "domain": "chat", "messages": [{"role": "user", "content": "hi"}]})
    for i, (line, why) in enumerate(bad_cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(MaskspecError, match=why) as exc:
            load_suite(path)
        assert f"{path}:2:" in str(exc.value)
    with pytest.raises(MaskspecError, match="does not exist"):
        load_suite(tmp_path / "missing.jsonl")
    dup = tmp_path / "dup.jsonl"
    dup.write_text(good + "\n" + good + "\n")
    with pytest.raises(MaskspecError, match="more than once"):
        load_suite(dup)


def test_domains_take_turns():
    from maskspec.bench.suites import in_domain_turns

    prompts = select_prompts(load_suite(), None, 2)
    turns = in_domain_turns(prompts)
    domains = list(dict.fromkeys(p.domain for p in prompts))
    assert sorted(p.id for p in turns) == sorted(p.id for p in prompts)
    assert [p.domain for p in turns[:len(domains)]] == domains  # the first of each domain, then the second
    assert [p.id for p in turns if p.domain == domains[0]] == [p.id for p in prompts if p.domain == domains[0]]
