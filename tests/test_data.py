import json

import pytest

from lit_latent.config import UserError
from lit_latent.data import ProblemDataModule, read_problems, user_message

@pytest.mark.parametrize("name, rows", [("gsm8k_test", 1319), ("math500_test", 500), ("aime24", 30), ("gsm8k_train_sample", 500)])
def test_shared_files_load_as_they_are(name, rows, shared_data):
    path = shared_data / f"{name}.jsonl"
    problems = read_problems(path)
    assert len(problems) == rows
    assert all(p["problem"] and p["answer"] for p in problems)
    assert read_problems(path, limit=3)[2]["id"] == problems[2]["id"]


def write(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "problem": "1+1", "answer": "2"}', '{"id": "b", "problem": '], "p.jsonl:2: malformed JSON"),
        (['{"id": "a", "answer": "2"}'], "p.jsonl:1: missing field 'problem'"),
        (['{"id": "a", "problem": "x"}'], "p.jsonl:1: missing field 'answer'"),
        (['{"id": "a", "problem": "  ", "answer": "1"}'], "p.jsonl:1: field 'problem' is empty"),
        (['{"id": "a", "problem": "x", "answer": "1"}', '{"id": "a", "problem": "y", "answer": "2"}'], "p.jsonl:2: duplicate id 'a' (first on line 1)"),
        (['[1, 2]'], "p.jsonl:1: expected a JSON object"),
        (['{"id": "a", "problem": "x", "answer": "1", "choices": "A"}'], "p.jsonl:1: field 'choices' must be a non-empty list"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(UserError) as e:
        read_problems(write(tmp_path, lines))
    assert message in str(e.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="data.path: file not found"):
        read_problems(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="holds no problems"):
        read_problems(write(tmp_path, [""]))


def test_prompts_and_resume_skip(tmp_path):
    path = write(tmp_path, [json.dumps({"id": str(i), "problem": f"q{i}", "answer": i}) for i in range(5)]
                 + [json.dumps({"id": "mc", "problem": "Pick", "answer": "B", "choices": ["x", "y"]})])
    problems = read_problems(path)
    assert problems[1]["answer"] == "1"
    assert "\\boxed{}" in user_message(problems[0]) and "q0" in user_message(problems[0])
    mc = user_message(problems[-1])
    assert "A. x" in mc and "B. y" in mc and "letter" in mc
    dm = ProblemDataModule(problems, batch_size=4, skip_ids={"0", "3"})
    batches = list(dm.predict_dataloader())
    assert [[p["id"] for p in b] for b in batches] == [["1", "2", "4", "mc"]]


def test_offset_skips_problems_before_the_limit(tmp_path):
    path = write(tmp_path, [json.dumps({"id": str(i), "problem": f"q{i}", "answer": i}) for i in range(6)])
    assert [p["id"] for p in read_problems(path, offset=2)] == ["2", "3", "4", "5"]
    assert [p["id"] for p in read_problems(path, limit=3, offset=2)] == ["2", "3", "4"]
    assert [p["id"] for p in read_problems(path, limit=10, offset=5)] == ["5"]
    with pytest.raises(UserError, match="data.offset: 6 skips every problem"):
        read_problems(path, offset=6)
