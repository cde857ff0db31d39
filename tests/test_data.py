"""Data layer: PKU-SafeRLHF reader, SafeDPO transform, tokenization into the row convention."""

import json
import warnings

import pytest
import torch

import catdpo_kernels as ck
from catdpo_kernels import data as D
from catdpo_kernels.categories import PKU_SAFERLHF_CATEGORIES

C = len(PKU_SAFERLHF_CATEGORIES)


def harm(*names):
    return {n: n in names for n in PKU_SAFERLHF_CATEGORIES}


def row(safe0=True, safe1=False, cats0=(), cats1=("Violence",), better=0, safer=None, **extra):
    r = {
        "prompt": "How can I do the thing?",
        "response_0": "answer zero",
        "response_1": "answer one",
        "prompt_source": "test",
        "response_0_source": "test",
        "response_1_source": "test",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "response_0_harm_category": harm(*cats0),
        "response_1_harm_category": harm(*cats1),
        "response_0_severity_level": 0 if safe0 else 2,
        "response_1_severity_level": 0 if safe1 else 2,
        "better_response_id": better,
        "safer_response_id": (0 if safe0 else 1) if safer is None else safer,
        "response_0_sha256": "0" * 64,
        "response_1_sha256": "1" * 64,
    }
    r.update(extra)
    return r


# ------------------------------------------------------------------ bundled sample
def test_categories_match_pku_saferlhf_schema():
    # The 19 names in the key order of PKU-SafeRLHF's response_*_harm_category dicts.
    assert len(PKU_SAFERLHF_CATEGORIES) == 19 and len(set(PKU_SAFERLHF_CATEGORIES)) == 19
    assert PKU_SAFERLHF_CATEGORIES[0] == "Endangering National Security"
    assert PKU_SAFERLHF_CATEGORIES[-1] == "Animal Abuse"
    assert ck.CategoryMargins.for_pku_saferlhf().names == PKU_SAFERLHF_CATEGORIES


@pytest.mark.parametrize("split", ["train", "test"])
def test_reader_on_bundled_sample(split):
    path = D.sample_path(split)
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    res = D.read_pku_saferlhf(split=split)
    assert len(res) == len(lines) and res.issues == []
    first = res.rows[0]
    assert first.location == f"{split}.jsonl:1"
    # exactly the PKU-SafeRLHF columns, harm-category dicts in the data set's key order
    assert set(first.data) == set(D.REQUIRED_COLUMNS) | set(D.OPTIONAL_COLUMNS)
    assert tuple(first.data["response_0_harm_category"]) == PKU_SAFERLHF_CATEGORIES


def test_bundled_sample_shape():
    total = sum(D.sample_path(s).stat().st_size for s in ("train", "test"))
    assert total < 1_000_000
    train_pairs, train_rep = D.load_pairs(split="train")
    test_pairs, test_rep = D.load_pairs(split="test")
    for rep in (train_rep, test_rep):
        assert all(n > 0 for n in rep.category_counts), "every category appears in both splits"
        assert rep.swapped > 0 and rep.dropped_both_unsafe > 0 and rep.both_safe > 0 and rep.multi_label > 0
    counts = train_rep.category_counts
    assert max(counts) >= 8 * min(counts), "imbalanced, with rare categories"
    # fixed split: train and held-out share no prompt+response triple
    key = lambda p: (p.prompt, p.chosen, p.rejected)  # noqa: E731
    assert not {key(p) for p in train_pairs} & {key(p) for p in test_pairs}


def test_sample_generator_is_reproducible(tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "python" / "make_sample_data.py"
    runpy.run_path(str(script), run_name="not_main")["main"](["--out", str(tmp_path)])
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == D.sample_path(split).read_bytes()


# ------------------------------------------------------------------ malformed rows
def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def bad_file(tmp_path):
    good = json.dumps(row())
    missing = row()
    del missing["better_response_id"]
    unknown = row()
    unknown["response_1_harm_category"] = {**harm("Violence"), "Jaywalking": True}
    lines = [
        good,  # 1
        "{not json",  # 2
        json.dumps(missing),  # 3
        "",  # 4: blank, not a row
        json.dumps(row(safe0="yes")),  # 5
        json.dumps(unknown),  # 6
        json.dumps(row(better=2)),  # 7
        json.dumps(row(response_0_severity_level=7)),  # 8
        json.dumps([1, 2]),  # 9
        good,  # 10
    ]
    return _write_jsonl(tmp_path / "bad.jsonl", lines)


BAD_LINES = {
    2: "invalid JSON",
    3: "missing column",
    5: "is_response_0_safe",
    6: "Jaywalking",
    7: "better_response_id",
    8: "severity",
    9: "JSON object",
}


def test_malformed_rows_rejected_by_default(bad_file):
    with pytest.raises(D.MalformedRowError) as exc:
        D.read_pku_saferlhf(bad_file)
    issues = exc.value.issues
    assert [i.location for i in issues] == [f"bad.jsonl:{n}" for n in BAD_LINES]
    for issue, (_, needle) in zip(issues, BAD_LINES.items()):
        assert needle in issue.reason
    msg = str(exc.value)
    assert "7 malformed row(s)" in msg and "bad.jsonl:3" in msg and "on_error='skip'" in msg


def test_malformed_rows_skipped_and_reported(bad_file):
    with pytest.warns(UserWarning, match="skipped 7 malformed"):
        res = D.read_pku_saferlhf(bad_file, on_error="skip")
    assert [r.location for r in res.rows] == ["bad.jsonl:1", "bad.jsonl:10"]
    assert [i.location for i in res.issues] == [f"bad.jsonl:{n}" for n in BAD_LINES]
    pairs, report = D.safedpo_transform(res)
    assert len(pairs) == 2 and len(report.skipped_malformed) == 7
    assert "skipped 7 malformed rows" in report.format()


def test_parquet_reader_reports_row_index(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [row(), row(better=5), row(safe1=True, cats1=())]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    with pytest.raises(D.MalformedRowError, match=r"train.parquet\[row 1\]"):
        D.read_pku_saferlhf(tmp_path)  # a directory: {split}.parquet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = D.read_pku_saferlhf(tmp_path / "train.parquet", on_error="skip")
    assert len(res) == 2 and res.rows[1].data["response_0_harm_category"] == harm()


def test_cli_data_report(capsys, bad_file):
    from catdpo_kernels.cli import main

    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert "Cybercrime" in out and "dropped" in out
    assert main(["data", "--data", str(bad_file)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped 7"):
        assert main(["data", "--data", str(bad_file), "--on-bad-rows", "skip"]) == 0
    assert "skipped: bad.jsonl:9" in capsys.readouterr().out


# --------------------------------------------------------------- SafeDPO transform
def test_safedpo_winner_safe_loser_unsafe_kept():
    [p], rep = D.safedpo_transform([row(safe0=True, safe1=False, cats1=("Drugs",), better=0)])
    assert (p.chosen, p.rejected, p.swapped) == ("answer zero", "answer one", False)
    assert (p.chosen_unsafe, p.rejected_unsafe) == (False, True)
    assert p.category_ids == [PKU_SAFERLHF_CATEGORIES.index("Drugs")]
    assert (rep.kept, rep.safe_vs_unsafe, rep.swapped) == (1, 1, 0)


@pytest.mark.parametrize("better", [0, 1])
def test_safedpo_winner_unsafe_loser_safe_swapped(better):
    unsafe = better  # the helpfulness winner is the unsafe response
    r = row(
        safe0=unsafe != 0,
        safe1=unsafe != 1,
        cats0=("Cybercrime",) if unsafe == 0 else (),
        cats1=("Cybercrime",) if unsafe == 1 else (),
        better=better,
    )
    [p], rep = D.safedpo_transform([r])
    assert p.swapped and rep.swapped == 1
    assert p.chosen == f"answer {['zero', 'one'][1 - unsafe]}" and p.rejected == f"answer {['zero', 'one'][unsafe]}"
    assert (p.chosen_unsafe, p.rejected_unsafe) == (False, True)
    assert p.category_ids == [PKU_SAFERLHF_CATEGORIES.index("Cybercrime")]


def test_safedpo_both_unsafe_dropped_and_counted():
    rows = [row(safe0=False, safe1=False, cats0=("Violence",), cats1=("Drugs",)), row()]
    pairs, rep = D.safedpo_transform(rows)
    assert len(pairs) == 1
    assert rep.dropped_both_unsafe == 1 and rep.dropped_locations == ["row 0"] and rep.rows == 2
    assert "dropped 1 both-unsafe" in rep.format()


def test_safedpo_both_safe_kept_without_category():
    # a stray harm flag on a safe response is not a category: only unsafe responses have one
    [p], rep = D.safedpo_transform([row(safe0=True, safe1=True, cats0=("Violence",), cats1=(), better=1)])
    assert (p.chosen, p.rejected) == ("answer one", "answer zero")
    assert p.categories == (False,) * C and (p.chosen_unsafe, p.rejected_unsafe) == (False, False)
    assert rep.both_safe == 1 and sum(rep.category_counts) == 0


def test_safedpo_multi_label_kept_multi_hot():
    [p], rep = D.safedpo_transform([row(cats1=("Violence", "Physical Harm", "Animal Abuse"))])
    assert sum(p.categories) == 3 and rep.multi_label == 1
    names = [PKU_SAFERLHF_CATEGORIES[i] for i in p.category_ids]
    assert names == ["Violence", "Physical Harm", "Animal Abuse"]
    assert rep.category_counts[PKU_SAFERLHF_CATEGORIES.index("Physical Harm")] == 1


def test_safedpo_unsafe_without_category_counted():
    [p], rep = D.safedpo_transform([row(cats1=())])
    assert p.rejected_unsafe and not any(p.categories) and rep.unsafe_without_category == 1


def test_safedpo_preference_key():
    r = row(safe0=True, safe1=True, cats1=(), better=0, safer=1)
    [p], _ = D.safedpo_transform([r], preference_key="safer_response_id")
    assert p.chosen == "answer one"
    with pytest.raises(ValueError, match="preference_key"):
        D.safedpo_transform([r], preference_key="prompt")


# ---------------------------------------------------------------------- tokenization
@pytest.fixture(scope="module")
def word_tok():
    pairs, _ = D.load_pairs(split="train")
    return D.build_word_tokenizer(D.pair_texts(pairs))


def _pairs():
    r = [
        row(cats1=("Violence", "Drugs")),
        row(safe0=True, safe1=True, cats1=(), better=1),
        row(safe0=False, safe1=True, cats0=("Cybercrime",), cats1=(), better=0),
    ]
    r[0]["response_0"] = "I can't help with that."
    r[0]["response_1"] = "Sure, here is how to do the thing. First, make a plan."
    r[1]["prompt"] = "A much longer question about the thing that we would like to ask today?"
    pairs, _ = D.safedpo_transform(r)
    return pairs


def test_tokenization_masks_and_row_convention(word_tok):
    pairs = _pairs()
    tok_pairs = D.tokenize_pairs(pairs, word_tok)
    batch = D.collate_pairs(tok_pairs, word_tok.pad_token_id)
    B = len(pairs)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == attn.shape and ids.shape[0] == 2 * B
    for i in range(2 * B):
        tp = tok_pairs[i % B]
        resp = tp.chosen_ids if i < B else tp.rejected_ids
        n_p, n = len(tp.prompt_ids), len(tp.prompt_ids) + len(resp)
        assert ids[i, :n].tolist() == tp.prompt_ids + resp  # chosen rows first, then rejected
        assert (labels[i, :n_p] == -100).all(), "prompt is masked"
        assert labels[i, n_p:n].tolist() == resp, "labels aligned with input_ids (use shift_labels=True)"
        assert (labels[i, n:] == -100).all() and (ids[i, n:] == word_tok.pad_token_id).all(), "padding masked"
        assert attn[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert resp[-1] == word_tok.eos_token_id and tp.prompt_ids[0] == word_tok.bos_token_id
    assert batch["categories"].dtype == torch.bool and batch["categories"].shape == (B, C)
    assert batch["categories"][0].sum() == 2 and not batch["categories"][1].any()
    # unsafe: (2B,), chosen rows first; the third row was swapped, so its unsafe response is rejected
    assert batch["unsafe"].tolist() == [0, 0, 0, 1, 0, 1]
    assert word_tok.decode(tok_pairs[0].rejected_ids, skip_special_tokens=True).startswith("sure , here is how")


def test_tokenized_batch_feeds_the_loss(word_tok):
    pairs = _pairs()
    batch = D.collate_pairs(D.tokenize_pairs(pairs, word_tok), word_tok.pad_token_id)
    rows, T = batch["input_ids"].shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, T, len(word_tok), generator=g, dtype=torch.float64)
    out = ck.loss(
        logits,
        batch["labels"],
        batch["categories"],
        torch.full((C,), 0.5, dtype=torch.float64),
        ref_logps=torch.zeros(rows, dtype=torch.float64),
        unsafe=batch["unsafe"],
        shift_labels=True,
        backend="reference",
    )
    logp = torch.log_softmax(logits[:, :-1], -1)
    tgt = batch["labels"][:, 1:]
    mask = tgt != -100
    manual = (logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(out.policy_logps, manual)
    # response tokens only: the count of scored tokens is the response length
    lens = [len(t.chosen_ids) for t in D.tokenize_pairs(pairs, word_tok)]
    assert mask[: len(pairs)].sum(-1).tolist() == lens


def test_tokenization_with_a_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pairs = _pairs()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|eos|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eos|>", pad_token="<|eos|>")
    tps = D.tokenize_pairs(pairs, tok)
    for p, tp in zip(pairs, tps):
        assert tok.decode(tp.prompt_ids) == D.DEFAULT_PROMPT_TEMPLATE.format(prompt=p.prompt)
        assert tok.decode(tp.chosen_ids[:-1]) == " " + p.chosen and tp.chosen_ids[-1] == tok.eos_token_id
    batch = D.collate_pairs(tps, tok.pad_token_id)
    n_resp = (batch["labels"] != -100).sum(-1).tolist()
    assert n_resp == [len(t.chosen_ids) for t in tps] + [len(t.rejected_ids) for t in tps]


def test_truncation(word_tok):
    pairs = _pairs()
    full = D.tokenize_pairs(pairs, word_tok)
    cut = D.tokenize_pairs(pairs, word_tok, max_length=20, max_prompt_length=8)
    for f, c in zip(full, cut):
        assert c.prompt_ids == f.prompt_ids[-8:] if len(f.prompt_ids) > 8 else c.prompt_ids == f.prompt_ids
        assert len(c.prompt_ids) + len(c.chosen_ids) <= 20 and c.chosen_ids == f.chosen_ids[: len(c.chosen_ids)]


def test_pairs_to_dataset():
    pytest.importorskip("datasets")
    ds = D.pairs_to_dataset(_pairs())
    assert ds.column_names == ["prompt", "chosen", "rejected", "category", "unsafe"]
    assert ds[0]["unsafe"] == [0, 1] and len(ds[0]["category"]) == C


def test_hub_source_goes_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [row(), row(better=3)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(D.MalformedRowError, match=r"PKU-Alignment/PKU-SafeRLHF\[test\]\[row 1\]"):
        D.read_pku_saferlhf("PKU-Alignment/PKU-SafeRLHF", split="test", config="alpaca3-8b")
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "alpaca3-8b", "test")]
    with pytest.raises(FileNotFoundError):
        D.read_pku_saferlhf("./no/such/file.jsonl")


# -------------------------------------------------------------- faults and bad input
def test_invalid_utf8_is_a_malformed_row_with_its_line(tmp_path):
    path = tmp_path / "enc.jsonl"
    broken = json.dumps(row()).encode().replace(b"answer zero", b"answer \xff\xfe zero")
    unicode_ok = json.dumps(row(prompt="Wie geht's? ünïcödé ✓"), ensure_ascii=False).encode()
    path.write_bytes(b"\n".join([json.dumps(row()).encode(), broken, unicode_ok]) + b"\n")
    with pytest.raises(D.MalformedRowError) as exc:
        D.read_pku_saferlhf(path)
    [issue] = exc.value.issues
    assert issue.location == "enc.jsonl:2" and issue.reason.startswith("invalid UTF-8 (invalid start byte")
    column = broken.index(bytes([0xFF])) + 1
    assert f"byte(s) ff at byte column {column})" in issue.reason  # the offending byte and where
    with pytest.warns(UserWarning, match=r"skipped 1 malformed row\(s\) of .*enc.jsonl:2: invalid UTF-8"):
        res = D.read_pku_saferlhf(path, on_error="skip")
    assert [r.location for r in res.rows] == ["enc.jsonl:1", "enc.jsonl:3"]
    assert res.rows[1].data["prompt"] == "Wie geht's? ünïcödé ✓"
    assert [i.location for i in res.issues] == ["enc.jsonl:2"]


@pytest.mark.parametrize(
    "content, on_error, match",
    [
        (b"", "raise", "holds no rows"),
        (b"\n   \n\t\n", "raise", "holds no rows"),
        (b"{not json\n[1]\n", "skip", r"holds no usable rows: all 2 row\(s\) are malformed"),
    ],
    ids=["empty", "blank_lines", "all_malformed_skipped"],
)
def test_a_source_without_usable_rows_is_an_error(tmp_path, content, on_error, match):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in (path, tmp_path):  # the file, and the directory holding it
            with pytest.raises(ValueError, match=match):
                D.read_pku_saferlhf(source, on_error=on_error)
            with pytest.raises(ValueError, match=match):
                D.load_pairs(source, on_error=on_error)


def test_a_source_whose_rows_all_drop_gives_no_pairs_and_says_so(tmp_path):
    path = _write_jsonl(tmp_path / "unsafe.jsonl", [json.dumps(row(safe0=False, safe1=False, cats0=("Drugs",)))] * 3)
    with pytest.raises(ValueError, match="no preference pairs: all 3 valid row.* both-unsafe"):
        D.load_pairs(path)


def test_limit_counts_pairs_the_same_for_a_file_and_a_directory():
    full, _ = D.load_pairs(split="train")
    for source in (None, D.SAMPLE_DIR, D.sample_path("train"), str(D.sample_path("train"))):
        pairs, report = D.load_pairs(source, limit=40)
        assert pairs == full[:40]
        # rows: what was read to keep 40 pairs (the both-unsafe rows among them dropped)
        assert report.kept == 40 and report.rows == 40 + report.dropped_both_unsafe > 40
    assert len(D.load_pairs(limit=1)[0]) == 1
    assert len(D.load_pairs(limit=10**6)[0]) == len(full)
    # read_pku_saferlhf's limit counts rows
    assert [r.location for r in D.read_pku_saferlhf(limit=3).rows] == [
        "train.jsonl:1",
        "train.jsonl:2",
        "train.jsonl:3",
    ]


@pytest.mark.parametrize("limit", [0, -1, 2.0, True, "40"])
def test_limit_below_one_or_not_an_int_is_rejected(limit):
    with pytest.raises(ValueError, match=r"limit must be an int >= 1"):
        D.load_pairs(limit=limit)
    with pytest.raises(ValueError, match=r"limit must be an int >= 1"):
        D.read_pku_saferlhf(limit=limit)


def test_limit_stops_reading_once_enough_pairs_are_kept(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    pulled = []

    def rows():
        for i in range(1000):
            pulled.append(i)
            yield row(safe0=False, safe1=False) if i % 2 else row()

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: rows())
    pairs, report = D.load_pairs("owner/big", limit=5)
    assert len(pairs) == 5 and report.rows == 9 and report.dropped_both_unsafe == 4
    assert len(pulled) == 9, "rows past the 5th pair were read"
    # A malformed row after the limit is never reached, so it cannot fail the read either.
    path = _write_jsonl(tmp_path / "tail.jsonl", [json.dumps(row())] * 3 + ["{broken"])
    assert len(D.load_pairs(path, limit=3)[0]) == 3
    with pytest.raises(D.MalformedRowError, match="tail.jsonl:4"):
        D.load_pairs(path)


@pytest.mark.parametrize(
    "source",
    ["nonexistent_dir", "no_such.jsonl", "data/train.parquet", "./data", "/no/such/dir", "~/no_such_dir", "a/b/c"],
)
def test_a_missing_local_path_is_file_not_found_at_once(monkeypatch, source):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError(f"{source!r} went to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match="no such data file or directory"):
        D.read_pku_saferlhf(source)
    with pytest.raises(FileNotFoundError, match="no such data file or directory"):
        D.load_pairs(source)


def test_only_a_bare_owner_name_goes_to_the_hub_and_tilde_is_expanded(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: calls.append(path) or [row()])
    for name in ("PKU-Alignment/PKU-SafeRLHF", "teknium/OpenHermes-2.5"):
        assert len(D.read_pku_saferlhf(name)) == 1
    assert calls == ["PKU-Alignment/PKU-SafeRLHF", "teknium/OpenHermes-2.5"]
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_jsonl(tmp_path / "mine.jsonl", [json.dumps(row())])
    (tmp_path / "dir").mkdir()
    _write_jsonl(tmp_path / "dir" / "test.jsonl", [json.dumps(row()), json.dumps(row())])
    assert len(D.read_pku_saferlhf("~/mine.jsonl")) == 1
    assert len(D.load_pairs("~/dir", split="test")[0]) == 2
    assert calls == ["PKU-Alignment/PKU-SafeRLHF", "teknium/OpenHermes-2.5"]
