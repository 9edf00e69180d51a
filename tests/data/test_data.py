import json
from collections import Counter

import pytest
from conftest import run_cli

from loratrace.data.datasets import REGISTRY, DataError, load_split
from loratrace.data.encoding import Encoded
from loratrace.data.loader import EpochLoader


def test_bundled_sample_keeps_ids_and_lines():
    train = load_split("arc-challenge", "sample", "train")
    assert len(train) == 400
    assert [e.line for e in train] == list(range(400))
    assert train[1].example_id == "LTSYN_TRA_0001"
    assert len({e.example_id for e in train}) == 400
    assert train[0].prompt.startswith("Question: ") and train[0].prompt.endswith("\nAnswer:")


def _write(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"id": "q1", "question": "Which is wet?", "choices": {"text": ["rain", "sand"], "label": ["A", "B"]},
        "answerKey": "A"}


@pytest.mark.parametrize("bad, message", [
    ({k: v for k, v in GOOD.items() if k != "answerKey"}, "missing field 'answerKey'"),
    ({**GOOD, "answerKey": "C"}, "answer key 'C' is not among the labels"),
    ({**GOOD, "choices": {"text": [], "label": []}}, "empty choices"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD | {"id": "q2"}, bad])
    with pytest.raises(DataError, match=rf"{path} line 3: malformed arc-challenge row: {message}"):
        load_split("arc-challenge", str(path), "train")


def test_local_folder_and_positional_ids(tmp_path):
    rows = [{"goal": f"goal {i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_split("piqa", str(tmp_path), "validation")
    assert [e.example_id for e in examples] == [f"piqa/validation/{i}" for i in range(5)]
    assert [e.gold for e in examples] == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("name, row, n_choices, gold", [
    ("boolq", {"question": "is it", "passage": "p", "answer": True}, 2, 1),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}, 2, 1),
    ("hellaswag", {"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "2", "ind": 7}, 4, 2),
    ("winogrande", {"sentence": "s _", "option1": "a", "option2": "b", "answer": "2"}, 2, 1),
    ("openbookqa", {"id": "o1", "question_stem": "q", "choices": {"text": ["a", "b", "c", "d"],
                                                                   "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
     4, 3),
    ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}, 3, 2),
    ("arc-easy", {"id": "e1", "question": "q", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
                  "answerKey": "2"}, 4, 1),
])
def test_every_registered_format(name, row, n_choices, gold):
    _, question, choices, answer = REGISTRY[name].formatter(row)
    assert len(choices) == n_choices and answer == gold and question


def _encoded(n):
    return [Encoded(f"id{i}", i, [1, 2, 3], 1, [5, 6], 0) for i in range(n)]


def test_epoch_covers_every_example_once_and_epochs_differ():
    loader = EpochLoader(_encoded(37), batch_size=8, seed=3, pad_id=0)
    assert len(loader) == 5
    first = [i for b in loader for i in b["example_id"]]
    second = [i for b in loader for i in b["example_id"]]
    assert Counter(first) == Counter(f"id{i}" for i in range(37)) == Counter(second)
    assert first != second


@pytest.mark.parametrize("stop_after", [2, 5])  # inside an epoch, and exactly at its end
def test_state_dict_resumes_with_the_same_batches(stop_after):
    reference = EpochLoader(_encoded(37), 8, seed=3, pad_id=0)
    expected = [b["example_id"] for _ in range(2) for b in reference]
    loader = EpochLoader(_encoded(37), 8, seed=3, pad_id=0)
    seen = []
    for batch in loader:
        seen.append(batch["example_id"])
        if len(seen) == stop_after:
            break
    state = loader.state_dict()
    resumed = EpochLoader(_encoded(37), 8, seed=3, pad_id=0)
    resumed.load_state_dict(state)
    while len(seen) < len(expected):  # each pass is the rest of an epoch, as Lightning iterates
        seen += [b["example_id"] for b in resumed]
    assert seen == expected


def test_ranks_split_each_global_batch_without_overlap():
    loaders = [EpochLoader(_encoded(40), 4, seed=1, pad_id=0, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 5
    for b0, b1 in zip(*loaders):
        assert not set(b0["example_id"]) & set(b1["example_id"])
        assert len(b0["example_id"]) == len(b1["example_id"]) == 4


def test_loader_state_from_another_seed_is_refused():
    loader = EpochLoader(_encoded(10), 4, seed=1, pad_id=0)
    with pytest.raises(DataError, match=r"data order was made with training.seed=2, not 1"):
        loader.load_state_dict({"epoch": 0, "offset": 1, "seed": 2, "world_size": 1})
    with pytest.raises(DataError, match=r"trained by 2 process\(es\), not 1: .*resume with 2"):
        loader.load_state_dict({"epoch": 0, "offset": 1, "seed": 1, "world_size": 2})


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "choices": {"text": ["x", "y"], "label": ["A", "B", "C"]}, "answerKey": "C"},
     "3 choice labels for 2 choice texts"),
    ({**GOOD, "choices": {"text": ["x", "y"], "label": ["A", "A"]}}, r"repeated choice labels \['A', 'A'\]"),
])
def test_labels_that_do_not_match_the_texts_are_refused_at_load(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(DataError, match=rf"line 2: malformed arc-challenge row: {message}"):
        load_split("arc-challenge", str(path), "train")


def test_repeated_ids_get_positional_ids_with_one_notice(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD, GOOD | {"id": "q2"}, GOOD])
    notices = []
    examples = load_split("arc-challenge", str(path), "train", notice=notices.append)
    assert [e.example_id for e in examples] == ["q1", "arc-challenge/train/1", "q2", "arc-challenge/train/3"]
    assert len(notices) == 1
    assert "2 row(s) repeat an earlier row's id (line 2 repeats 'q1' of line 1)" in notices[0]


@pytest.mark.parametrize("content, message", [
    (b'{"id": "q1", "question": "caf\xe9"}\n', r"line 1: not UTF-8 text \(byte 0xe9 at column 30\)"),
    (b'{"id": "q1", "question": "unterminated\n', r"line 1, column 39: not valid JSON \(Invalid control "
                                                  r"character\)$"),
    (b'{"id": "q1"} trailing\n', r"line 1, column 14: not valid JSON \(Extra data\)$"),
])
def test_unreadable_lines_name_file_line_and_place(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + content)
    with pytest.raises(DataError, match=message.replace("line 1", "line 2")):
        load_split("arc-challenge", str(path), "train")


def test_junk_parquet_is_one_line(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"train.parquet: not a readable Parquet file"):
        load_split("arc-challenge", str(path), "train")
    result = run_cli("train", f"data.source={path}", f"--runs-dir={tmp_path / 'runs'}", "logging.swanlab=false")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("loratrace: error:")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_positional_id_that_is_another_rows_own_id_is_refused(tmp_path):
    """Issue #21: row 0's explicit id `arc-challenge/train/3` and row 3's missing id (its positional fallback) were
    one example id, so `trace` merged two examples."""
    no_id = {k: v for k, v in GOOD.items() if k != "id"}
    path = _write(tmp_path, [GOOD | {"id": "arc-challenge/train/3"}, GOOD | {"id": "q2"}, GOOD | {"id": "q3"}, no_id])
    with pytest.raises(DataError, match=rf"^{path} line 4: its example id 'arc-challenge/train/3' is also the id of "
                                        r"line 1; give one of the two rows another id$"):
        load_split("arc-challenge", str(path), "train")


def test_a_repeated_id_whose_fallback_is_taken_is_refused(tmp_path):
    path = _write(tmp_path, [GOOD, GOOD | {"id": "arc-challenge/train/2"}, GOOD])
    with pytest.raises(DataError, match=r"line 3: its example id 'arc-challenge/train/2' is also the id of line 2"):
        load_split("arc-challenge", str(path), "train", notice=lambda line: None)


HUB_CHOICES = {"text": ["rain", "sand"], "label": ["A", "B"]}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "question": 3}, r"question is a number \(3\), expected text"),
    ({**GOOD, "question": float("nan")}, "question is NaN, expected text"),
    ({**GOOD, "choices": {"text": ["rain", None], "label": ["A", "B"]}}, r"choices.text\[1\] is null, expected text"),
    ({**GOOD, "choices": {"text": [{"t": "rain"}, "sand"], "label": ["A", "B"]}},
     r"choices.text\[0\] is a mapping, expected text"),
    ({**GOOD, "choices": {"text": "ab", "label": ["A", "B"]}}, "choices.text is a string, expected a list"),
    ({**GOOD, "choices": "rain, sand"}, "choices is a string, expected a list or a mapping"),
    ({**GOOD, "choices": [{"text": None, "label": "A"}]}, r"choices\[0\].text is null, expected text"),
    ({**GOOD, "choices": ["rain", "sand"]}, r"choices\[0\] is a string, expected a mapping with text and label"),
    ({**GOOD, "question": {"stem": 7, "choices": [{"text": "a", "label": "A"}]}}, r"question.stem is a number \(7\)"),
])
def test_a_row_with_the_wrong_kind_of_value_is_refused_naming_file_and_line(tmp_path, bad, message):
    """Issue #27.6: a number or NaN for a question, a null or mapping for a choice text, a string for the choice list
    (it was split into letters) made a traceback or a silently odd prompt."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")  # json writes NaN as the reader takes it
    with pytest.raises(DataError, match=rf"^{path} line 2: malformed arc-challenge row: {message}"):
        load_split("arc-challenge", str(path), "train")


def test_other_formats_refuse_a_value_that_is_not_text(tmp_path):
    rows = [{"goal": "g", "sol1": "a", "sol2": None, "label": 0}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 1: malformed piqa row: missing field 'sol2'"):
        load_split("piqa", str(tmp_path), "train")
    (tmp_path / "train.jsonl").write_text(json.dumps({"ctx": "c", "endings": "abcd", "label": "0"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: malformed hellaswag row: endings is a string, expected a list"):
        load_split("hellaswag", str(tmp_path), "train")


def test_the_original_ai2_arc_jsonl_layout_loads_like_the_hub_layout(tmp_path):
    """The layout people download from AI2 nests stem and choices under `question`; it was refused for lacking a
    top-level `choices`. Rows written here, in that layout and in the hub's, give the same examples."""
    choices = [{"text": "rain", "label": "A"}, {"text": "sand", "label": "B"}, {"text": "dust", "label": "C"}]
    ai2 = [{"id": f"made_up_{i}", "question": {"stem": f"Which is wet {i}?", "choices": choices},
            "answerKey": "ABC"[i % 3]} for i in range(3)]
    hub = [{"id": r["id"], "question": r["question"]["stem"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]},
            "answerKey": r["answerKey"]} for r in ai2]
    (tmp_path / "ai2").mkdir()
    (tmp_path / "hub").mkdir()
    _write(tmp_path / "ai2", ai2)
    _write(tmp_path / "hub", hub)
    from_ai2 = load_split("arc-challenge", str(tmp_path / "ai2" / "train.jsonl"), "train")
    assert from_ai2 == load_split("arc-challenge", str(tmp_path / "hub" / "train.jsonl"), "train")
    assert [e.example_id for e in from_ai2] == ["made_up_0", "made_up_1", "made_up_2"]
    assert [e.gold for e in from_ai2] == [0, 1, 2]
    assert from_ai2[1].prompt == "Question: Which is wet 1?\nA. rain\nB. sand\nC. dust\nAnswer:"


def test_a_bad_row_stops_train_in_one_line_before_anything_is_written(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "id": "q2", "question": 3}])  # was a traceback from format_prompt
    result = run_cli("train", f"data.source={path}", f"runs_dir={tmp_path / 'runs'}", "logging.swanlab=false",
                     "logging.tensorboard=false")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"loratrace: error: {path} line 2: malformed arc-challenge row: question is a number (3), "
                             "expected text\n")
    assert not (tmp_path / "runs").exists()
