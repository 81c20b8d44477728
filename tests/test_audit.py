"""`corral audit` checks, one crafted record per finding, and the contamination test on both of
its rules (a near instruction, a shared 13-gram)."""

from __future__ import annotations

from corral.evaluation.audit import audit_records, format_audit, repetition_detail

from corral.contamination import find_contamination
from corral.records import SeedTask

CLEAN = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Translate the word to French.", "input": "cat", "output": "chat"},
    {"instruction": "Translate the word to French.", "input": "dog", "output": "chien"},
    {"instruction": "Give an antonym of the adjective.", "input": "hot", "output": "cold"},
    {"instruction": "Summarize the plot of a fairy tale.", "input": "", "output": "A girl..."},
]


def findings_of(records, **kwargs) -> dict[str, list[int]]:
    result = audit_records(records, **kwargs)
    return {name: [f.index for f in found] for name, found in result.by_check().items() if found}


def test_clean_records_and_instances_of_one_task_have_no_findings():
    assert findings_of(CLEAN) == {}


def test_each_check_finds_its_record():
    loop = "The cat sat on the mat. " * 12
    records = [
        *CLEAN,  # 0-4
        dict(CLEAN[0]),  # 5: exact duplicate of 0
        {"instruction": "Name three of the primary colors.", "input": "", "output": "Red."},  # 6
        {"instruction": "Write a haiku about rain.", "input": "", "output": "   "},  # 7
        {"instruction": "Describe a cat in detail.", "input": "", "output": loop},  # 8
        {"instruction": "Repeat after me please.", "input": "", "output": "Repeat after me please"},
        {"instruction": "List some prime numbers.", "input": "", "output": "N/A"},  # 10
        {
            "instruction": "What is your favourite food?",
            "input": "",
            "output": "As an AI language model, I do not have preferences.",
        },  # 11
        {"instruction": "Add the two numbers.", "input": "<no input>", "output": "4"},  # 12
        {"instruction": "Écris une phrase en français.", "input": "", "output": "Été où ça à"},
    ]
    found = findings_of(records)
    assert found == {
        "exact_duplicate": [5],
        "near_duplicate": [6],
        "empty_output": [7],
        "repetition_loop": [8],
        "copies_prompt": [9],
        "placeholder_output": [10],
        "refusal": [11],
        "placeholder_input": [12],
        "non_english": [13],
        "length_outlier": [8],  # the loop is also far longer than the rest
    }


def test_fix_drops_what_the_drop_checks_found_and_empties_placeholder_inputs():
    records = [*CLEAN, dict(CLEAN[0]), {"instruction": "Add them.", "input": "<noinput>",
                                        "output": "4"}]  # fmt: skip
    result = audit_records(records)
    fixed = result.fix(records)
    assert fixed == [*CLEAN, {"instruction": "Add them.", "input": "", "output": "4"}]
    table = format_audit(result)
    assert "exact_duplicate" in table and "--fix would drop 1 and keep 6" in table


def test_length_outliers_are_listed_not_dropped():
    vocabulary = [f"w{n}" for n in range(6000)]
    records = [
        {
            "instruction": f"Describe {vocabulary[i]} with {vocabulary[i + 100]} please now.",
            "input": "",
            "output": " ".join(vocabulary[200 + 10 * i : 210 + 10 * i]),
        }
        for i in range(30)
    ]
    essay = " ".join(vocabulary[:5000])
    records.append({"instruction": "Write an essay about anything.", "input": "", "output": essay})
    result = audit_records(records)
    assert [f.index for f in result.by_check()["length_outlier"]] == [30]
    assert len(result.fix(records)) == 31


def test_repetition_detail():
    assert repetition_detail("one two three " * 10) is not None
    assert repetition_detail("line\n" * 5) is not None
    assert repetition_detail("A normal answer with varied words and nothing repeated.") is None


def test_contamination_by_near_instruction_and_by_13_gram():
    evaluation = [
        SeedTask(
            instruction="Rewrite the given text and correct grammar, spelling, and punctuation.",
            instances=[{"input": "If you told me a year ago", "output": "Had you told me"}],
        ),
        SeedTask(
            instruction="Suggest a name for the startup.",
            instances=[
                {
                    "input": "",
                    "output": "a company that makes solar powered backpacks for hikers who walk "
                    "long distances in remote mountain areas",
                }
            ],
        ),
    ]
    records = [
        *CLEAN,
        {
            "instruction": "Rewrite the given text and correct the grammar, spelling and "
            "punctuation.",
            "input": "",
            "output": "...",
        },
        {
            "instruction": "Describe a product.",
            "input": "",
            "output": "It is a company that makes solar powered backpacks for hikers who walk "
            "long distances in remote places.",
        },
    ]
    hits = find_contamination(records, evaluation)
    assert [(h.record_index, h.eval_index, h.reason) for h in hits] == [
        (5, 0, "near_instruction"),
        (6, 1, "shared_13gram"),
    ]
    assert findings_of(records, eval_tasks=evaluation)["contamination"] == [5, 6]


def test_near_seed():
    seeds = [SeedTask(instruction="Name three primary colors.", instances=[{"input": "",
                                                                          "output": "x"}])]  # fmt: skip
    assert findings_of(CLEAN, seed_tasks=seeds) == {"near_seed": [0]}


def test_cli_audit_fix_strict_and_json(tmp_path, capsys):
    import json

    from corral.cli import main as corral_main
    from corral.records import read_alpaca, write_alpaca

    data, evaluation, fixed = tmp_path / "d.json", tmp_path / "eval.jsonl", tmp_path / "f.json"
    records = [*CLEAN, dict(CLEAN[0]), {"instruction": "Add them.", "input": "<noinput>",
                                        "output": "4"}]  # fmt: skip
    write_alpaca(data, records)
    task = {"instruction": CLEAN[3]["instruction"], "instances": [{"input": "", "output": "x"}]}
    evaluation.write_text(json.dumps(task) + "\n")
    assert corral_main(["audit", str(data), "--fix", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert "exact_duplicate" in out and "would drop 1 and keep 6" in out
    assert read_alpaca(fixed)[-1] == {"instruction": "Add them.", "input": "", "output": "4"}

    assert corral_main(["audit", str(data), "--eval-set", str(evaluation), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"]["contamination"]["records"] == 1
    assert corral_main(["audit", str(data), "--eval-set", str(evaluation), "--strict"]) == 1
    assert "1 records match the evaluation set" in capsys.readouterr().err
    assert corral_main(["audit", str(data), "--fix", str(data)]) == 2  # never its own input
    assert "would overwrite the input" in capsys.readouterr().err


def test_min_score_drops_low_and_unscored_records():
    records = [
        {**CLEAN[0], "score": 5.0},
        {**CLEAN[1], "score": 4.4},
        {**CLEAN[3], "score": None},
        {**CLEAN[4], "score": 4.5},
    ]
    result = audit_records(records, min_score=4.5)
    assert [f.index for f in result.by_check()["low_score"]] == [1, 2]
    assert [r["instruction"] for r in result.fix(records)] == [
        CLEAN[0]["instruction"],
        CLEAN[4]["instruction"],
    ]


def test_a_score_that_is_not_a_finite_number_is_refused_naming_the_record(tmp_path, capsys):
    import json

    from corral.cli import main as corral_main

    for bad in ("NaN", "Infinity", "-Infinity", '"high"', '"4.9"', "true"):
        data = tmp_path / "scored.jsonl"
        lines = [json.dumps({**CLEAN[0], "score": 5.0}), json.dumps(CLEAN[1])]
        lines.append(json.dumps(CLEAN[3])[:-1] + f', "score": {bad}}}')
        data.write_text("\n".join(lines) + "\n")
        fixed = tmp_path / "best.json"
        code = corral_main(["audit", str(data), "--min-score", "4", "--fix", str(fixed)])
        err = capsys.readouterr().err
        assert code == 2, bad
        assert f"{data}: record 2: field 'score': expected a finite number" in err, err
        assert not fixed.exists()


def test_the_audit_api_never_keeps_a_non_finite_score():
    records = [{**CLEAN[0], "score": float("nan")}, {**CLEAN[1], "score": float("inf")}]
    assert findings_of(records, min_score=4.0)["low_score"] == [0, 1]


def test_nan_is_never_written_as_json(tmp_path):
    import pytest

    from corral.records import write_alpaca

    path = tmp_path / "out.json"
    with pytest.raises(ValueError):
        write_alpaca(path, [{**CLEAN[0], "score": float("nan")}])
    assert not path.exists()
