"""The grammar compiler: its cache, shared per tokenizer, and the errors it raises."""

from __future__ import annotations

import pytest

from shared import constraints
from worker.engine.engine import Engine
from worker.engine.grammar import ConstraintError, GrammarCompiler, compiler_for
from worker.engine.rows import Constraint

BACKENDS = list(constraints.BACKENDS)


def test_compiled_grammars_are_cached_per_backend_and_constraint(tokenizer):
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id}, len(tokenizer), cache_size=2)
    date = Constraint(constraints.REGEX, "[0-9]{4}", constraints.OUTLINES)
    first = compiler.compile(date)
    assert compiler.compile(Constraint(constraints.REGEX, "[0-9]{4}", constraints.OUTLINES)) is first
    assert compiler.stats.hits == 1 and compiler.stats.misses == 1
    other_backend = compiler.compile(Constraint(constraints.REGEX, "[0-9]{4}", constraints.LLGUIDANCE))
    assert other_backend is not first
    compiler.compile(Constraint(constraints.REGEX, "[a-z]", constraints.OUTLINES))  # evicts the oldest
    assert not compiler.is_cached(date)
    assert compiler_for(tokenizer, {tokenizer.eos_token_id}, len(tokenizer)) is compiler_for(
        tokenizer, {tokenizer.eos_token_id}, len(tokenizer)
    )


def test_engines_over_one_tokenizer_share_the_cache(tiny_model, tokenizer):
    constraint = Constraint(constraints.REGEX, "[0-9]{3}x", constraints.OUTLINES)
    grammar = Engine(tiny_model, tokenizer).prepare_constraint(constraint)
    assert Engine(tiny_model, tokenizer).prepare_constraint(constraint) is grammar


@pytest.mark.parametrize("backend", BACKENDS)
def test_constraints_a_backend_cannot_compile_raise_constraint_error(engine, backend):
    with pytest.raises(ConstraintError) as caught:
        engine.prepare_constraint(Constraint(constraints.REGEX, "a(?=b)", backend))
    assert backend in str(caught.value) and caught.value.status == 400


def test_unknown_backend_raises_constraint_error(engine):
    with pytest.raises(ConstraintError, match="outlines, xgrammar, llguidance"):
        engine.prepare_constraint(Constraint(constraints.REGEX, "a", "nope"))
