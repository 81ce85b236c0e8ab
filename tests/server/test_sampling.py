"""Tests for shardserve_server.engine.sampling: filters, penalties, seeds and distributions."""

from __future__ import annotations

import math

import pytest
import torch

from shardserve_server.engine.sampling import (
    Sampler,
    SamplingParams,
    make_generator,
    top_logprobs,
)

GREEDY = SamplingParams(temperature=0.0)


def _random_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3.0  # [B, V]


def _sample(
    sampler: Sampler,
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = logits.shape[0]
    return sampler.sample_with_full_logprobs(
        logits,
        params,
        generators if generators is not None else [None] * batch,
        prompts if prompts is not None else [[] for _ in range(batch)],
        outputs if outputs is not None else [[] for _ in range(batch)],
    )


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- greedy and filters that reduce to greedy ---------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = _random_logits(8, 50)
    tokens, logprobs, full = _sample(Sampler(seed=0), logits, [GREEDY] * 8)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.allclose(full, torch.log_softmax(logits, dim=-1))
    assert torch.allclose(logprobs, full.gather(1, tokens[:, None]).squeeze(1))
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32


def test_greedy_rows_in_a_mixed_batch_are_exact_argmax() -> None:
    logits = _random_logits(6, 40, seed=1)
    params = [GREEDY, SamplingParams(temperature=1.5), GREEDY, SamplingParams(top_p=0.5)] + [
        GREEDY
    ] * 2
    for step in range(5):
        tokens, logprobs, _ = _sample(Sampler(seed=step), logits, params)
        for i in (0, 2, 4, 5):
            assert tokens[i] == logits[i].argmax()
            expected = torch.log_softmax(logits[i], dim=-1)[tokens[i]]
            assert torch.allclose(logprobs[i], expected)


def test_greedy_with_half_precision_logits() -> None:
    logits = _random_logits(4, 30, seed=2).to(torch.bfloat16)
    params = [GREEDY, GREEDY, SamplingParams(), SamplingParams(top_k=3)]
    tokens, logprobs, _ = _sample(Sampler(seed=0), logits, params)
    assert torch.equal(tokens[:2], logits[:2].argmax(dim=-1))
    assert logprobs.dtype == torch.float32


@pytest.mark.parametrize("seed", range(5))
def test_top_k_one_equals_greedy(seed: int) -> None:
    logits = _random_logits(5, 64, seed=seed)
    params = [SamplingParams(temperature=1.3, top_k=1)] * 5
    tokens, logprobs, _ = _sample(Sampler(seed=seed), logits, params)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    # The processed distribution has one token left, so its logprob is 0.
    assert torch.allclose(logprobs, torch.zeros(5))


@pytest.mark.parametrize("seed", range(5))
def test_tiny_top_p_equals_greedy(seed: int) -> None:
    logits = _random_logits(5, 64, seed=seed)
    params = [SamplingParams(temperature=0.9, top_p=1e-6)] * 5
    tokens, _, _ = _sample(Sampler(seed=seed), logits, params)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_keeps_exactly_k_tokens() -> None:
    logits = _random_logits(3, 20, seed=3)
    _, _, full = _sample(Sampler(seed=0), logits, [SamplingParams(top_k=k) for k in (1, 4, 20)])
    kept = torch.isfinite(full).sum(dim=-1)
    assert kept.tolist() == [1, 4, 20]
    for row, k in ((0, 1), (1, 4)):
        assert set(full[row].topk(k).indices.tolist()) == set(logits[row].topk(k).indices.tolist())


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()  # [1, 4]
    for top_p, kept in ((0.45, 1), (0.6, 2), (0.85, 3), (0.96, 4)):
        _, _, full = _sample(Sampler(seed=0), logits, [SamplingParams(top_p=top_p)])
        assert int(torch.isfinite(full).sum()) == kept, top_p
        expected = probs[0, :kept] / probs[0, :kept].sum()
        assert torch.allclose(full[0, :kept].exp(), expected, atol=1e-6)


def test_min_p_filters_relative_to_top_token() -> None:
    probs = torch.tensor([[0.4, 0.25, 0.19, 0.1, 0.06]])
    logits = probs.log()  # [1, 5]
    params = [SamplingParams(min_p=0.5)]  # threshold 0.2: keeps 0.4 and 0.25
    _, _, full = _sample(Sampler(seed=0), logits, params)
    assert torch.isfinite(full[0]).tolist() == [True, True, False, False, False]
    assert torch.allclose(full[0, :2].exp(), torch.tensor([0.4, 0.25]) / 0.65)
    batch = torch.cat([logits] * 500)  # [500, 5]
    tokens, _, _ = _sample(Sampler(seed=1), batch, params * 500)
    assert set(tokens.tolist()) == {0, 1}


def test_filters_apply_after_temperature() -> None:
    # Relative to the top token the probabilities are [1, 1/2, 1/3] at temperature 1, so
    # min_p=0.2 keeps all three; at temperature 0.5 they are [1, 1/4, 1/9], so 0.3 keeps one.
    logits = torch.tensor([[0.0, -math.log(2), -math.log(3)]])
    _, _, hot = _sample(Sampler(seed=0), logits, [SamplingParams(min_p=0.2)])
    _, _, cold = _sample(Sampler(seed=0), logits, [SamplingParams(temperature=0.5, min_p=0.3)])
    assert int(torch.isfinite(hot).sum()) == 3
    assert int(torch.isfinite(cold).sum()) == 1


# --- penalties ------------------------------------------------------------------------------


def test_penalties_follow_the_formulae() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0, -2.0]])  # [1, 6]
    prompt = [[0, 5]]
    output = [[1, 1, 2]]
    # Repetition 2 on tokens 0, 5 (prompt) and 1, 2 (output): positive / 2, negative * 2.
    after_rep = torch.tensor([1.0, -2.0, 0.25, 0.0, 3.0, -4.0])
    # Frequency 0.5 * count and presence 0.25 on the output tokens only (1 twice, 2 once).
    after_all = after_rep - torch.tensor([0.0, 1.25, 0.75, 0.0, 0.0, 0.0])
    cases = [
        (SamplingParams(temperature=0.0, repetition_penalty=2.0), after_rep),
        (
            SamplingParams(
                temperature=0.0,
                repetition_penalty=2.0,
                frequency_penalty=0.5,
                presence_penalty=0.25,
            ),
            after_all,
        ),
        (
            SamplingParams(temperature=0.0, frequency_penalty=-1.0),
            logits[0] + torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0, 0.0]),
        ),
    ]
    for params, expected in cases:
        tokens, logprobs, full = _sample(Sampler(seed=0), logits, [params], None, prompt, output)
        assert torch.allclose(full[0], torch.log_softmax(expected, dim=-1)), params
        assert tokens[0] == expected.argmax()
        assert torch.allclose(logprobs[0], torch.log_softmax(expected, dim=-1)[tokens[0]])


def test_penalty_can_change_the_greedy_token() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0)]
    tokens, _, _ = _sample(Sampler(seed=0), logits, params, None, [[]], [[0]])
    assert tokens.tolist() == [1]


def test_penalties_are_per_row_and_ignore_out_of_vocab_ids() -> None:
    logits = torch.zeros(3, 4) + torch.tensor([1.0, 2.0, 3.0, 4.0])  # [3, 4]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=4.0),
        GREEDY,
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
    ]
    prompts = [[3, 99, -1], [3], [3]]
    outputs = [[], [3], [3, 3, 1000]]
    _, _, full = _sample(Sampler(seed=0), logits, params, None, prompts, outputs)
    expected = torch.tensor([[1.0, 2.0, 3.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 2.0]])
    assert torch.allclose(full, torch.log_softmax(expected, dim=-1))


def test_logits_are_not_modified_in_place() -> None:
    logits = _random_logits(2, 10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, top_k=3, min_p=0.1), SamplingParams(top_p=0.3)]
    _sample(Sampler(seed=0), logits, params, None, [[1, 2], [3]], [[4], []])
    assert torch.equal(logits, before)


# --- logprobs -------------------------------------------------------------------------------


def test_sampled_logprobs_are_of_the_processed_distribution() -> None:
    logits = _random_logits(4, 12, seed=4)
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=2.0, top_k=5),
        SamplingParams(top_p=0.6),
        GREEDY,
    ]
    tokens, logprobs, full = _sample(Sampler(seed=0), logits, params)
    assert torch.allclose(full[0], torch.log_softmax(logits[0] / 0.7, dim=-1))
    top5 = logits[1].topk(5).indices
    assert torch.allclose(full[1, top5].exp().sum(), torch.tensor(1.0))
    assert torch.allclose(full[1, top5], torch.log_softmax(logits[1, top5] / 2.0, dim=-1))
    assert torch.allclose(logprobs, full.gather(1, tokens[:, None]).squeeze(1))
    assert torch.isfinite(logprobs).all()


def test_top_logprobs() -> None:
    full = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]]), dim=-1)
    values, ids = top_logprobs(full, 2)
    assert ids.tolist() == [[1, 2], [2, 3]]
    assert torch.equal(values, full.gather(1, ids))
    values, ids = top_logprobs(full, 10)
    assert values.shape == (2, 4)
    assert top_logprobs(full, 0)[0].shape == (2, 0)
    with pytest.raises(ValueError):
        top_logprobs(full, -1)


# --- seeds ----------------------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    vocab = 200
    target = _random_logits(1, vocab, seed=5)[0] * 0.3  # [V], fairly flat
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    others = _random_logits(5, vocab, seed=6)  # [5, V]

    def run(batch_rows: list[int], position: int) -> list[int]:
        generator = make_generator(params.seed)
        other_gens = [make_generator(100 + i) for i in range(len(batch_rows))]
        sampler = Sampler()  # unseeded: the shared generator must not matter
        tokens = []
        for _ in range(20):
            rows = [others[r] for r in batch_rows]
            rows.insert(position, target)
            logits = torch.stack(rows)  # [B, V]
            row_params = [SamplingParams(temperature=0.8, top_k=50)] * len(batch_rows)
            row_params.insert(position, params)
            gens: list[torch.Generator | None] = list(other_gens)
            gens.insert(position, generator)
            batch = len(row_params)
            out, _ = sampler.sample(logits, row_params, gens, [[]] * batch, [[]] * batch)
            tokens.append(int(out[position]))
        return tokens

    alone = run([], 0)
    assert run([0, 1, 2], 1) == alone
    assert run([3, 4], 2) == alone
    assert run([4, 3, 2, 1, 0], 0) == alone
    assert len(set(alone)) > 5  # it really sampled


def test_ties_do_not_make_a_seeded_row_depend_on_the_batch() -> None:
    # bf16 logits are full of ties; top-k/top-p must keep the same set for a row whatever
    # the other rows ask for (here they change how many values are ranked).
    vocab = 300
    g = torch.Generator().manual_seed(8)
    target = (torch.randint(0, 6, (vocab,), generator=g).float() * 0.5).to(torch.bfloat16)
    params = SamplingParams(top_k=20, top_p=0.7, seed=5)
    results = []
    for other_k in (0, 3, 50, 299):
        logits = torch.stack([target, target.flip(0)])  # [2, V]
        batch = [params, SamplingParams(top_k=other_k)]
        gens: list[torch.Generator | None] = [make_generator(5), None]
        sampler = Sampler(seed=0)
        tokens = [
            int(sampler.sample(logits, batch, gens, [[]] * 2, [[]] * 2)[0][0]) for _ in range(30)
        ]
        results.append(tokens)
    assert all(r == results[0] for r in results)
    _, _, full = _sample(Sampler(seed=0), target[None].float(), [SamplingParams(top_k=20)])
    kept = int(torch.isfinite(full).sum())
    assert kept >= 20  # ties with the 20th value are kept too
    assert kept == int((target.float() >= target.float().topk(20).values[-1]).sum())


def test_unseeded_rows_do_not_disturb_seeded_rows() -> None:
    logits = _random_logits(3, 100, seed=7) * 0.2
    params = [SamplingParams(seed=9), SamplingParams(), SamplingParams()]
    first, _ = Sampler().sample(logits, params, [make_generator(9), None, None], [[]] * 3, [[]] * 3)
    again, _ = Sampler().sample(logits, params, [make_generator(9), None, None], [[]] * 3, [[]] * 3)
    assert first[0] == again[0]


def test_different_seeds_give_different_tokens() -> None:
    vocab = 1000
    logits = torch.zeros(1, vocab)  # uniform
    seen = set()
    for seed in range(32):
        params = [SamplingParams(seed=seed)]
        tokens, _ = Sampler().sample(logits, params, [make_generator(seed)], [[]], [[]])
        seen.add(int(tokens[0]))
    # 32 draws from 1000 uniform tokens: fixed seeds, so this is deterministic; a sampler that
    # ignored the seed would give 1 distinct token.
    assert len(seen) >= 28


def test_seed_without_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="seed"):
        Sampler().sample(torch.zeros(1, 4), [SamplingParams(seed=3)], [None], [[]], [[]])


# --- distributions --------------------------------------------------------------------------

# Chi-square critical values at p = 0.001; every draw below uses fixed seeds, so the tests are
# deterministic, and the bound only says that the fixed draws look like the target law.
_CHI2_999 = {2: 13.82, 3: 16.27, 5: 20.52}


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_frequencies_match_softmax(temperature: float) -> None:
    draws = 4000
    base = torch.tensor([1.0, 0.2, -0.5, 0.8, -1.5, 0.0])  # [V]
    logits = base.expand(draws, -1)  # [N, V]
    params = [SamplingParams(temperature=temperature)] * draws
    tokens, _, _ = _sample(Sampler(seed=2024), logits, params)
    counts = torch.bincount(tokens, minlength=6).float()
    probs = torch.softmax(base / temperature, dim=-1)
    assert _chi_square(counts, probs) < _CHI2_999[5]


def test_frequencies_with_one_generator_over_many_steps() -> None:
    base = torch.tensor([[0.5, 0.0, -0.5, 1.0]])  # [1, V]
    generator = make_generator(77)
    sampler = Sampler()
    params = [SamplingParams(seed=77)]
    counts = torch.zeros(4)
    for _ in range(2000):
        token, _ = sampler.sample(base, params, [generator], [[]], [[]])
        counts[token] += 1
    assert _chi_square(counts, torch.softmax(base[0], dim=-1)) < _CHI2_999[3]


def test_frequencies_match_truncated_distribution() -> None:
    draws = 4000
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0])  # [V]
    logits = base.expand(draws, -1)  # [N, V]
    params = [SamplingParams(temperature=0.8, top_k=4, top_p=0.9)] * draws
    tokens, _, full = _sample(Sampler(seed=99), logits, params)
    probs = torch.softmax(base / 0.8, dim=-1)
    kept = probs[:4] / probs[:4].sum()
    # top_p 0.9 of the top-4 renormalised: drop token 3 if the first three already reach 0.9.
    n_keep = int((kept.cumsum(0) - kept < 0.9).sum())
    target = kept[:n_keep] / kept[:n_keep].sum()
    counts = torch.bincount(tokens, minlength=7).float()
    assert counts[n_keep:].sum() == 0
    assert torch.allclose(full[0, :n_keep].exp(), target, atol=1e-6)
    assert _chi_square(counts[:n_keep], target) < _CHI2_999[n_keep - 1]


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", -3.0),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.5),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):  # validated when made: never in use
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_valid_edges_pass() -> None:
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, seed=0),
        SamplingParams(frequency_penalty=-2.0, presence_penalty=2.0, seed=2**64 - 1),
        SamplingParams(top_k=1, top_p=1e-9, repetition_penalty=1e-3),
    ):
        params.validate()  # made without an error, and still valid


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_batch_size_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="generators"):
        Sampler().sample(torch.zeros(2, 3), [GREEDY] * 2, [None], [[]] * 2, [[]] * 2)
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(torch.zeros(3), [GREEDY], [None], [[]], [[]])


def test_sample_without_logprobs_is_the_plain_greedy_argmax():
    """logprobs=False with every row plain greedy: the argmax and no logprobs; any penalty or
    sampled row still goes through the full sampler (and returns logprobs)."""
    from shardserve_server.engine.sampling import Sampler, SamplingParams

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    greedy = [SamplingParams(temperature=0.0)] * 3
    s = Sampler(seed=0)
    toks, lps = s.sample(logits, greedy, [None] * 3, [[1]] * 3, [[]] * 3, logprobs=False)
    assert lps is None and torch.equal(toks, logits.argmax(-1))
    full_toks, full_lps = s.sample(logits, greedy, [None] * 3, [[1]] * 3, [[]] * 3)
    assert torch.equal(full_toks, toks) and full_lps is not None
    pen = [SamplingParams(temperature=0.0, repetition_penalty=1.5)] * 3
    _, pen_lps = s.sample(logits, pen, [None] * 3, [[1]] * 3, [[]] * 3, logprobs=False)
    assert pen_lps is not None
