import time

import numpy as np
import pytest

from runtimes.decoding import Sampler, decode
from runtimes.protocol import Sampling


def test_greedy_takes_the_argmax():
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert Sampler(Sampling(4), 2)(logits).tolist() == [1, 0]


def test_streams_are_per_sequence_and_independent_of_batching():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50))
    seeds = (11, 22, 33)
    batched = Sampler(Sampling(4, temperature=0.8, seeds=seeds), 3)
    alone = [Sampler(Sampling(4, temperature=0.8, seeds=(s,)), 1) for s in seeds]
    for _ in range(5):
        together = batched(logits)
        one_by_one = [a(logits[i : i + 1])[0] for i, a in enumerate(alone)]
        assert together.tolist() == one_by_one


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([[0.6, 0.3, 0.05, 0.05]]))
    sampler = Sampler(Sampling(4, temperature=1.0, top_p=0.8, seeds=(0,)), 1)
    drawn = {int(sampler(logits)[0]) for _ in range(300)}
    assert drawn == {0, 1}


def test_sampling_needs_a_seed_per_sequence():
    with pytest.raises(ValueError, match="one seed per sequence"):
        Sampler(Sampling(4, temperature=0.7, seeds=(1,)), 2)


def test_decode_stops_each_sequence_at_eos_and_feeds_the_batch_one_shape():
    vocab, eos = 5, 4
    # sequence 0 says 1, 2, eos; sequence 1 says 3, 3, 3, ... until the length limit
    script = {0: [1, 2, eos], 1: [3] * 10}
    fed = []

    def logits_for(step_index):
        out = np.zeros((2, vocab))
        for seq in (0, 1):
            out[seq, script[seq][min(step_index, len(script[seq]) - 1)]] = 1.0
        return out

    def step(tokens):
        fed.append(tokens.tolist())
        return logits_for(len(fed))

    result = decode(logits_for(0), step, Sampling(max_new_tokens=5), [eos])
    assert result.token_ids == [[1, 2, eos], [3, 3, 3, 3, 3]]
    assert result.finish_reasons == ["stop", "length"]
    assert all(len(tokens) == 2 for tokens in fed) and fed[-1][0] == eos


def test_ignore_eos_decodes_every_sequence_to_its_length():
    vocab, eos = 5, 4
    always_eos = np.zeros((2, vocab))
    always_eos[:, eos] = 1.0
    fed = []

    def step(tokens):
        fed.append(tokens.tolist())
        return always_eos

    result = decode(always_eos, step, Sampling(max_new_tokens=4, ignore_eos=True), [eos])
    assert result.token_ids == [[eos] * 4, [eos] * 4]
    assert result.finish_reasons == ["length", "length"]
    assert len(fed) == 3
    assert decode(always_eos, step, Sampling(max_new_tokens=4), [eos]).token_ids == [[eos], [eos]]


def test_generations_time_the_first_token_from_the_start_of_the_call():
    class Ids:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    started = time.perf_counter()
    logits = np.eye(3)[[1]]
    time.sleep(0.02)
    result = decode(logits, lambda tokens: logits, Sampling(max_new_tokens=3), [])
    (generation,) = result.generations(Ids(), prefix_tokens=5, suffix_tokens=2, started=started)
    assert 20 <= generation.first_token_ms <= generation.ms
    assert generation.generated_tokens == 3 and generation.reused_tokens == 5
