"""What is trained is what is served, token for token: for every template, the prompt Corral sends
the model for a turn (rendered whole and encoded as `chat`, `serve` and `infer` do) is exactly the
beginning of the ids a run trained on, up to that turn's answer; for Alpaca records, conversations
(system prompts, unanswered last turns, truncation) and preference pairs; and through a running
`corral serve`, which reports the ids it gave the model (`return_token_ids`)."""

from __future__ import annotations

import openai
import pytest
from corral.training.conversations import tokenize_conversation, tokenize_conversations
from corral.training.data import IGNORE_INDEX, tokenize_record
from corral.training.preference import tokenize_pair

from corral.templates import TEMPLATE_NAMES, encode_prompt, get_template

PLANET = [
    {"role": "user", "content": "Name a planet with rings."},
    {"role": "assistant", "content": "Saturn."},
]
CONVERSATIONS = {
    "one turn": PLANET,
    "system and three turns": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour of the sky."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And of grass?"},
        {"role": "assistant", "content": "Green, mostly.\nSometimes yellow."},
        {"role": "user", "content": "Which is warmer: 12 or 31 degrees?"},
        {"role": "assistant", "content": "31 degrees."},
    ],
    "no system, two turns": [
        *PLANET,
        {"role": "user", "content": "List two more, one per line."},
        {"role": "assistant", "content": "1. Jupiter\n2. Uranus"},
    ],
}


def served_prompt(tokenizer, template, messages) -> list[int]:
    """The ids `chat`/`serve`/`infer` send for a conversation ending with a user message, built
    here as the report describes them, not through training's code."""
    if template.name == "chat":
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = template.format_conversation(messages)
    return encode_prompt(tokenizer, template, text)


def whole_text(tokenizer, template, messages) -> str:
    if template.name == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(piece for piece, _ in template.conversation_segments(messages))


def answer_positions(messages) -> list[int]:
    return [i for i, message in enumerate(messages) if message["role"] == "assistant"]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_the_prompt_served_for_each_turn_begins_the_training_ids(
    embedded_tokenizer, name, conversation
):
    template = get_template(name, embedded_tokenizer)
    messages = CONVERSATIONS[conversation]
    example, status = tokenize_conversation(
        messages, 0, embedded_tokenizer, template, max_length=2048
    )
    assert status == "kept"
    ids, labels = example.input_ids, example.labels
    # The same text tokenized whole: no cut where the tokenizer would not cut.
    assert ids == encode_prompt(
        embedded_tokenizer, template, whole_text(embedded_tokenizer, template, messages)
    )
    for position in answer_positions(messages):
        served = served_prompt(embedded_tokenizer, template, messages[:position])
        assert ids[: len(served)] == served, f"turn before message {position}"
        # The served prompt is untrained; the answer right after it is trained.
        assert labels[: len(served)][-1] == IGNORE_INDEX
        assert labels[len(served)] == ids[len(served)]
        answer = messages[position]["content"]
        assert embedded_tokenizer.decode(ids[len(served) :]).lstrip().startswith(answer)


def test_the_vicuna_example_of_the_report(embedded_tokenizer):
    """The system block and the first user turn are one string to the tokenizer: ' US', 'ER',
    as served, not ' ', 'USER' from tokenizing them apart."""
    template = get_template("vicuna", embedded_tokenizer)
    example, _ = tokenize_conversation(PLANET, 0, embedded_tokenizer, template, max_length=512)
    served = encode_prompt(embedded_tokenizer, template, template.format_conversation(PLANET[:1]))
    assert example.input_ids[: len(served)] == served
    tokens = embedded_tokenizer.convert_ids_to_tokens(example.input_ids)
    assert ["ĠUS", "ER"] == tokens[tokens.index("ER") - 1 : tokens.index("ER") + 1]
    assert "USER" not in tokens


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_a_follow_up_question_is_served_after_every_id_trained_on(embedded_tokenizer, name):
    """The unanswered last turn: the prompt for a question asked after the last answer starts
    with the whole training sequence."""
    template = get_template(name, embedded_tokenizer)
    messages = CONVERSATIONS["system and three turns"]
    example, _ = tokenize_conversation(messages, 0, embedded_tokenizer, template, max_length=2048)
    follow_up = [*messages, {"role": "user", "content": "Why?"}]
    served = served_prompt(embedded_tokenizer, template, follow_up)
    assert served[: len(example.input_ids)] == example.input_ids
    assert len(served) > len(example.input_ids)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_a_truncated_conversation_keeps_the_served_prompts_that_fit(embedded_tokenizer, name):
    template = get_template(name, embedded_tokenizer)
    messages = CONVERSATIONS["system and three turns"]
    full, _ = tokenize_conversation(messages, 0, embedded_tokenizer, template, max_length=2048)
    last = answer_positions(messages)[-1]
    cut_at = len(served_prompt(embedded_tokenizer, template, messages[:last])) + 2
    cut, status = tokenize_conversation(
        messages, 0, embedded_tokenizer, template, max_length=cut_at, truncation="truncate"
    )
    assert status == "truncated" and cut.input_ids == full.input_ids[:cut_at]
    assert cut.labels == full.labels[:cut_at]
    for position in answer_positions(messages):
        served = served_prompt(embedded_tokenizer, template, messages[:position])
        assert cut.input_ids[: len(served)] == served


RECORDS = [
    {"instruction": "Name a planet with rings.", "input": "", "output": "Saturn."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
]


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_an_alpaca_record_trains_after_the_prompt_infer_and_serve_send(
    embedded_tokenizer, name, train_on_inputs
):
    template = get_template(name, embedded_tokenizer)
    for record in RECORDS:
        example, _ = tokenize_record(
            record, 0, embedded_tokenizer, template, max_length=512,
            train_on_inputs=train_on_inputs,
        )  # fmt: skip
        prompt = template.format_prompt(record["instruction"], record["input"])
        served = encode_prompt(embedded_tokenizer, template, prompt)  # what `infer` sends
        assert example.input_ids[: len(served)] == served
        completion = template.format_completion(record["output"])
        assert example.input_ids == encode_prompt(embedded_tokenizer, template, prompt + completion)
        trained_prompt = example.labels[: len(served)]
        assert trained_prompt == (served if train_on_inputs else [IGNORE_INDEX] * len(served))
        assert example.labels[len(served) :] == example.input_ids[len(served) :]
        if not record["input"]:  # the same question through the chat API
            user = [{"role": "user", "content": record["instruction"]}]
            assert served_prompt(embedded_tokenizer, template, user) == served


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_a_preference_pair_shares_the_served_prompt(embedded_tokenizer, name):
    template = get_template(name, embedded_tokenizer)
    record = {"prompt": "Name a planet with rings.", "input": "", "chosen": "Saturn.",
              "rejected": "Mars has rings."}  # fmt: skip
    pair, _ = tokenize_pair(record, 0, embedded_tokenizer, template, max_length=512)
    served = served_prompt(
        embedded_tokenizer, template, [{"role": "user", "content": record["prompt"]}]
    )
    prompt = template.format_prompt(record["prompt"])
    for example, key in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
        assert example.input_ids[: len(served)] == served
        assert example.labels[: len(served)] == [IGNORE_INDEX] * len(served)
        whole = prompt + template.format_completion(record[key])
        assert example.input_ids == encode_prompt(embedded_tokenizer, template, whole)


def test_a_merge_across_an_answer_boundary_is_reported_once_with_template_and_boundary(
    embedded_tokenizer,
):
    """An answer that starts with spaces: alone it tokenizes as ' ', ' Saturn'; in the served
    text of the next turn the response marker's newline takes a space ('\\n ', ' Saturn'). No ids
    can be both, so the run says where."""
    template = get_template("alpaca", embedded_tokenizer)
    spaced = [
        {"role": "user", "content": "Name a planet with rings."},
        {"role": "assistant", "content": "  Saturn."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Uranus."},
    ]
    conversations = [{"messages": PLANET}, {"messages": spaced}, {"messages": spaced}]
    examples, report = tokenize_conversations(
        conversations, embedded_tokenizer, template, max_length=512
    )
    assert len(examples) == 3 and report.served_departures == 2
    summary = report.summary()
    assert summary.count("warning") == 1 and "\n" not in summary
    assert "conversation 1: template 'alpaca'" in summary
    assert "prompt served for turn 2" in summary and "where answer 1 begins" in summary
    # The answer is still trained as written, and the first prompt is still the served one.
    served = served_prompt(embedded_tokenizer, template, spaced[:1])
    assert examples[1].input_ids[: len(served)] == served
    _, clean = tokenize_conversations(
        [{"messages": PLANET}], embedded_tokenizer, template, max_length=512
    )
    assert clean.served_departures == 0 and "warning" not in clean.summary()


# ---------------------------------------------------------------------------- through the server


@pytest.mark.slow
# vicuna in every run of the suite; the other four with the long tests (make test-long), to keep
# make test under ten minutes.
@pytest.mark.parametrize(
    "name",
    [
        "vicuna",
        *(pytest.param(n, marks=pytest.mark.long) for n in ("guanaco", "chat", "alpaca", "dolly")),
    ],
)
def test_corral_serve_sends_the_model_the_ids_a_conversation_trained_on(
    tmp_path, tiny_model_path, embedded_tokenizer, name
):
    """A LoRA run in each template (random adapter weights on the tiny LLaMA, which uses the
    embedded tokenizer), served by `corral serve`: the prompt ids it reports for every turn of a
    conversation are the training ids of that conversation up to the turn's answer."""
    from model_runs import random_lora_run
    from servers import corral_serve

    from corral.models import load_tokenizer

    run = random_lora_run(tmp_path / name, "tiny-random", tiny_model_path, template=name)
    tokenizer = load_tokenizer(str(run))
    template = get_template(name, tokenizer)
    messages = CONVERSATIONS["system and three turns"]
    example, _ = tokenize_conversation(messages, 0, tokenizer, template, max_length=2048)
    record, _ = tokenize_record(RECORDS[0], 0, tokenizer, template, max_length=512)
    with corral_serve(
        ["--run", str(run), "--dtype", "float32"], env={"CORRAL_API_KEY": ""}
    ) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        for position in answer_positions(messages):
            reply = client.chat.completions.create(
                model=model, messages=messages[:position], max_tokens=2, temperature=0,
                extra_body={"return_token_ids": True},
            )  # fmt: skip
            served = reply.model_extra["prompt_token_ids"]
            assert served == example.input_ids[: len(served)]
            assert example.labels[len(served)] != IGNORE_INDEX  # the answer starts right there
            assert reply.usage.prompt_tokens == len(served)
            assert reply.choices[0].model_extra["token_ids"]
        # An Alpaca record asked as one chat turn, and as a completions prompt (as `infer` does).
        user = [{"role": "user", "content": RECORDS[0]["instruction"]}]
        reply = client.chat.completions.create(
            model=model, messages=user, max_tokens=1, extra_body={"return_token_ids": True}
        )
        prompt_ids = [t for t, label in zip(record.input_ids, record.labels, strict=True)
                      if label == IGNORE_INDEX]  # fmt: skip
        assert reply.model_extra["prompt_token_ids"] == prompt_ids
        completion = client.completions.create(
            model=model, prompt=template.format_prompt(RECORDS[0]["instruction"]), max_tokens=1,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        assert completion.choices[0].model_extra["prompt_token_ids"] == prompt_ids
