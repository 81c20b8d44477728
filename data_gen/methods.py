"""The rounds of the magpie and evol modes, on the shared generation loop of pipeline.py.

The loop (journal, resume, over-target trimming, manifest, lineage) is the one the alpaca and
self-instruct modes use: each round here returns accepted tasks (`instruction`, `instances`,
`lineage`, and `conversation` for multi-turn Magpie) and counts its drops on the run's
generator, whose shared steps (teacher requests, length rules, ROUGE-L novelty, contamination) it
calls. A round draws its randomness only from the round's generator, and the evolution pool is
rebuilt from the journal's tasks, so a resumed run carries on as an uninterrupted one would.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from corral.data_gen import evol, filters, magpie
from corral.data_gen.config import GenerateConfig
from corral.data_gen.reasoning import reasoning_and_answer, split_reasoning
from corral.data_gen.teachers import SamplingParams

from corral.records import SeedTask
from corral.rouge import RougeNoveltyIndex


def method_fingerprint(config: GenerateConfig) -> dict[str, Any]:
    """The settings of the magpie and evol modes that a resumed journal must share."""
    if config.mode == "magpie":
        return {
            "system_prompt": config.system_prompt,
            "magpie_turns": config.magpie_turns,
            "magpie_tokenizer": config.magpie_tokenizer,
            "query_max_tokens": config.query_max_tokens,
            "max_repetition": config.max_repetition,
            "language": config.language,
            "keep_reasoning": config.keep_reasoning,
        }
    if config.mode == "evol":
        return {
            "evol_generations": config.evol_generations,
            "evol_operations": list(config.evol_operations),
            "evol_min_new_words": config.evol_min_new_words,
            "keep_reasoning": config.keep_reasoning,
        }
    return {}


def method_for(config: GenerateConfig, seeds: list[SeedTask], teacher: Any) -> Any:
    """The round maker of a magpie or evol run; None for the modes pipeline.py runs itself."""
    if config.mode == "magpie":
        tokenizer = getattr(teacher, "tokenizer", None) or load_template_tokenizer(config)
        return MagpieRounds(config, tokenizer, endpoint=config.teacher == "openai")
    if config.mode == "evol":
        return EvolRounds(config, seeds)
    return None


# ---------------------------------------------------------------- Magpie


def load_template_tokenizer(config: GenerateConfig) -> Any:
    """The tokenizer whose chat template splits: `magpie_tokenizer`, else the teacher model's."""
    from transformers import AutoTokenizer

    from corral.errors import CorralError
    from corral.models import load_tokenizer

    name = config.magpie_tokenizer or config.model
    try:
        if Path(name).expanduser().is_dir():
            return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
        return load_tokenizer(name)
    except (CorralError, OSError, ValueError) as exc:
        raise magpie.TemplateSplitError(
            f"magpie mode needs the teacher's chat template, and the tokenizer {name!r} cannot be "
            f"loaded ({magpie.one_line(exc)}); give magpie_tokenizer=FOLDER (a copy of the served "
            "model's tokenizer files)"
        ) from None


def check_magpie_teacher(config: GenerateConfig) -> magpie.PreQuery:
    """Refuse, before any work, a teacher whose chat template cannot be split (raises
    TemplateSplitError saying why); the pre-query prefix otherwise."""
    rounds = MagpieRounds(
        config, load_template_tokenizer(config), endpoint=config.teacher == "openai"
    )
    return rounds.query_split([])


class MagpieRounds:
    """Magpie rounds: the teacher writes each user turn from its template's pre-query prefix (a
    raw completion), then answers it; Magpie's filters, the length rules and novelty decide."""

    def __init__(self, config: GenerateConfig, tokenizer: Any, *, endpoint: bool) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.who = f"the chat template of {config.magpie_tokenizer or config.model!r}"
        if not getattr(tokenizer, "chat_template", None):
            raise magpie.TemplateSplitError(
                f"{self.who}: there is none (a base model?); Magpie needs an aligned chat "
                "model's template"
            )
        # An endpoint (vLLM) tokenizes a completion prompt with the model's BOS in front: a prefix
        # that already starts with the BOS text would get it twice.
        bos = getattr(tokenizer, "bos_token", None)
        adds_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.strip_bos = bos if endpoint and adds_bos else None
        self.filters = magpie.MagpieFilters(config.max_repetition, config.language)
        self.query_split([])  # refuse an unsplittable template before any request

    def restore(self, tasks: list[dict[str, Any]]) -> None:
        """Nothing to rebuild: a Magpie round depends on no earlier round."""

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _raw(self, text: str) -> str:
        if self.strip_bos and text.startswith(self.strip_bos):
            return text[len(self.strip_bos) :]
        return text

    def query_split(self, turns: list[dict[str, str]]) -> magpie.PreQuery:
        history = magpie.conversation_messages(self.config.system_prompt, turns)
        return magpie.pre_query(self._render, history, who=self.who)

    def answer_split(self, turns: list[dict[str, str]]) -> tuple[str, tuple[str, ...]]:
        """The prompt that has the teacher answer the last user turn, and where its answer ends."""
        messages = magpie.conversation_messages(self.config.system_prompt, turns)
        sentinel = "CorralSentinelAnswer"
        closed = self._render([*messages, {"role": "assistant", "content": sentinel}], False)
        end = closed[closed.find(sentinel) + len(sentinel) :].strip() if sentinel in closed else ""
        return self._raw(self._render(messages, True)), tuple(s for s in (end,) if s)

    def round(self, gen: Any, rng: random.Random, size: int) -> list[dict[str, Any]]:
        c = self.config
        conversations: list[list[dict[str, str]]] = [[] for _ in range(size)]
        in_round = RougeNoveltyIndex(c.rouge_threshold)
        first_turn_info: dict[int, dict[str, Any]] = {}
        for turn in range(c.magpie_turns):
            growing = [i for i in range(size) if len(conversations[i]) == 2 * turn]
            if not growing:
                break
            splits = [self.query_split(conversations[i]) for i in growing]
            params = SamplingParams(
                temperature=c.temperature,
                top_p=c.top_p,
                max_tokens=c.query_max_tokens,
                stop=splits[0].stops,
            )
            replies = gen._completions([self._raw(s.prefix) for s in splits], params)
            asked = []
            for i, split, reply in zip(growing, splits, replies, strict=True):
                query = self._accept_query(gen, reply, split, in_round, first=turn == 0)
                if query is None:
                    continue
                if turn == 0:
                    first_turn_info[i] = query[1]
                conversations[i].append({"role": "user", "content": query[0]})
                asked.append(i)
            if not asked:
                break
            prompts_and_stops = [self.answer_split(conversations[i]) for i in asked]
            params = SamplingParams(
                temperature=c.temperature,
                top_p=c.top_p,
                max_tokens=c.max_tokens,
                stop=prompts_and_stops[0][1] if prompts_and_stops else (),
                presence_penalty=c.presence_penalty,
            )
            answers = gen._completions([p for p, _ in prompts_and_stops], params)
            for i, (_, stops), reply in zip(asked, prompts_and_stops, answers, strict=True):
                reason, reasoning, text = self._answer(reply, stops)
                if reason is not None:
                    if reply is not None:  # a failed request is counted as such already
                        gen.drops[reason if turn == 0 else filters.UNUSABLE_TURN] += 1
                    conversations[i].pop()  # the question stays unasked
                    continue
                answer = {"role": "assistant", "content": text}
                if reasoning and c.keep_reasoning:
                    answer["reasoning"] = reasoning  # not sent back in later turns' prompts
                conversations[i].append(answer)
        return self._accepted(gen, conversations, first_turn_info)

    def _accept_query(
        self,
        gen: Any,
        reply: Any,
        split: magpie.PreQuery,
        in_round: RougeNoveltyIndex,
        *,
        first: bool,
    ) -> tuple[str, dict[str, Any]] | None:
        """The question a reply holds and its novelty info, or None (the drop counted)."""
        if reply is None:
            return None
        if reply.finish_reason == "length":
            gen.drops[magpie.QUERY_CUT_OFF if first else filters.UNUSABLE_TURN] += 1
            return None
        query = magpie.parse_turn_text(reply.text, split.stops)
        if first:
            gen.candidates += 1
        reason = self.filters.query_drop_reason(query) if query else filters.TOO_SHORT
        if not first:
            if reason is None:
                reason = gen.rules.drop_reason(query)
            if reason is not None:
                gen.drops[filters.UNUSABLE_TURN] += 1
                return None
            return query, {}
        if reason is not None:
            gen.drops[reason] += 1
            return None
        info = gen._accept_instruction(query, add=False)  # length rules, novelty vs the pool
        if info is None:
            return None
        if not in_round.add_if_novel(query).novel:  # the same prefix asks alike within a round
            gen.drops[filters.NOT_NOVEL] += 1
            return None
        return query, info

    def _answer(self, reply: Any, stops: tuple[str, ...]) -> tuple[str | None, str, str]:
        """(why the answer is dropped or None, the teacher's reasoning, the answer)."""
        if reply is None:
            return filters.REQUEST_FAILED, "", ""
        if reply.finish_reason == "length":
            return magpie.ANSWER_CUT_OFF, "", ""
        reasoning, text = reasoning_and_answer(magpie.parse_turn_text(reply.text, stops),
                                               reply.reasoning)  # fmt: skip
        if not text:
            return filters.EMPTY_OUTPUT, reasoning, ""
        return self.filters.answer_drop_reason(text), reasoning, text

    def _accepted(
        self,
        gen: Any,
        conversations: list[list[dict[str, str]]],
        info: dict[int, dict[str, Any]],
    ) -> list[dict[str, Any]]:
        accepted = []
        for request, turns in enumerate(conversations):
            if len(turns) < 2:
                continue
            question, answer = turns[0]["content"], turns[1]["content"]
            instances = [{"input": "", "output": answer}]
            if turns[1].get("reasoning"):
                instances[0]["reasoning"] = turns[1]["reasoning"]
            if not admit_instruction(gen, question, instances):
                continue
            task = {
                "instruction": question,
                "instances": instances,
                **info[request],
                "lineage": {
                    "request": request,
                    "seeds": [],
                    "system_prompt": self.config.system_prompt,
                },
            }
            if self.config.magpie_turns > 1:
                task["conversation"] = turns
            accepted.append(task)
        return accepted


# ---------------------------------------------------------------- Evol-Instruct


class EvolRounds:
    """Evol-Instruct rounds: parents drawn from the seeds and the kept evolutions (those evolved
    fewer than `evol_generations` times), each rewritten by a random operation, eliminated by
    WizardLM's rules, answered, then checked by the length rules and novelty."""

    def __init__(self, config: GenerateConfig, seeds: list[SeedTask]) -> None:
        self.config = config
        self.operations = list(config.evol_operations)
        # Each pool entry: the text to evolve, its generation, its root seed, and its chain from
        # the root to itself ({instruction, operation}; the root's operation is None).
        self.pool: list[dict[str, Any]] = [
            {
                "text": _seed_text(seed),
                "generation": 0,
                "seed": seed.id,
                "chain": [{"instruction": _seed_text(seed), "operation": None}],
            }
            for seed in seeds
        ]

    def restore(self, tasks: list[dict[str, Any]]) -> None:
        for task in tasks:
            self._grow_pool(task)

    def _grow_pool(self, task: dict[str, Any]) -> None:
        origin = task["lineage"]
        if origin.get("generation", self.config.evol_generations) < self.config.evol_generations:
            self.pool.append(
                {
                    "text": task["instruction"],
                    "generation": origin["generation"],
                    "seed": (origin.get("seeds") or [""])[0],
                    "chain": origin["ancestors"]
                    + [{"instruction": task["instruction"], "operation": origin["operation"]}],
                }
            )

    def round(self, gen: Any, rng: random.Random, size: int) -> list[dict[str, Any]]:
        c = self.config
        parents = [rng.choice(self.pool) for _ in range(size)]
        operations = [rng.choice(self.operations) for _ in range(size)]
        params = SamplingParams(
            temperature=c.temperature,
            top_p=c.top_p,
            max_tokens=c.query_max_tokens,
            presence_penalty=c.presence_penalty,
        )
        rewrites = gen._completions(
            [
                evol.evolution_prompt(op, p["text"])
                for p, op in zip(parents, operations, strict=True)
            ],
            params,
        )
        in_round = RougeNoveltyIndex(c.rouge_threshold)
        candidates = []
        for request, (parent, operation, reply) in enumerate(
            zip(parents, operations, rewrites, strict=True)
        ):
            if reply is None:
                continue
            if reply.finish_reason == "length":
                gen.drops[magpie.QUERY_CUT_OFF] += 1
                continue
            evolved = evol.parse_evolved(split_reasoning(reply.text)[1])  # thinking dropped
            gen.candidates += 1
            reason = evol.instruction_elimination(
                parent["text"], evolved, operation, c.evol_min_new_words
            )
            if reason is not None:
                gen.drops[reason] += 1
                continue
            info = gen._accept_instruction(evolved, add=False)
            if info is None:
                continue
            if not in_round.add_if_novel(evolved).novel:
                gen.drops[filters.NOT_NOVEL] += 1
                continue
            candidates.append((request, parent, operation, evolved, info))
        if not candidates:
            return []  # no request (nor an empty Batch API batch) for answers
        raw = getattr(gen.teacher, "api", "chat") == "completions"
        params = SamplingParams(
            temperature=c.temperature,
            top_p=c.top_p,
            max_tokens=c.max_tokens,
            presence_penalty=c.presence_penalty,
        )
        answers = gen._completions(
            [evol.answer_prompt(evolved, raw=raw) for _, _, _, evolved, _ in candidates], params
        )
        accepted = []
        for (request, parent, operation, evolved, info), reply in zip(
            candidates, answers, strict=True
        ):
            if reply is None:
                continue
            if reply.finish_reason == "length":
                gen.drops[magpie.ANSWER_CUT_OFF] += 1
                continue
            reasoning, answer = reasoning_and_answer(reply.text, reply.reasoning)
            reason = evol.answer_elimination(answer)
            if reason is not None:
                gen.drops[reason] += 1
                continue
            instances = [{"input": "", "output": answer}]
            if reasoning and c.keep_reasoning:
                instances[0]["reasoning"] = reasoning
            if not admit_instruction(gen, evolved, instances):
                continue
            task = {
                "instruction": evolved,
                "instances": instances,
                **info,
                "lineage": {
                    "request": request,
                    "seeds": [parent["seed"]],
                    "generation": parent["generation"] + 1,
                    "operation": operation,
                    "ancestors": parent["chain"],  # root seed first, the parent last
                },
            }
            self._grow_pool(task)
            accepted.append(task)
        return accepted


def _seed_text(seed: SeedTask) -> str:
    """A seed as one self-contained instruction (its first instance's input folded in)."""
    first = seed.instances[0]["input"].strip() if seed.instances else ""
    return f"{seed.instruction}\n\n{first}" if first else seed.instruction


def admit_instruction(gen: Any, instruction: str, instances: list[dict[str, Any]]) -> bool:
    """What every kept instruction of these modes passes, as in the other modes: not drawn from
    the evaluation set, and novel by exact ROUGE-L (which then adds it to the index)."""
    if gen._contaminated(instruction, instances):
        return False
    if not gen.index.add_if_novel(instruction).novel:
        gen.drops[filters.NOT_NOVEL] += 1
        return False
    return True
