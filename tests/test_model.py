"""model/: shapes, accounting, training signal, generation, checkpoints and Hugging Face parity."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_model, load_tokenizer, save_checkpoint
from model.config import PRESETS, ModelConfig, preset
from model.generate import IncrementalDetokenizer, SamplingParams, generate, generate_stream
from model.llama import Transformer, language_model_loss


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_config(name):
    config = preset(name)
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters


def test_presets_span_one_million_to_over_a_billion():
    sizes = {name: preset(name).num_parameters for name in PRESETS}
    assert 0.8e6 < sizes["1m"] < 2e6
    assert 8e6 < sizes["10m"] < 14e6
    assert 110e6 < sizes["125m"] < 140e6
    assert 1.2e9 < sizes["1.3b"] < 1.45e9


def test_flops_per_token_is_six_n_plus_attention():
    config = preset("10m")
    seq = 256
    n = config.n_layers * config.params_per_layer + config.vocab_size * config.dim
    assert config.flops_per_token(seq) == 6 * n + 12 * config.n_layers * config.dim * seq
    # The attention term grows with context; the 6N term does not.
    assert config.flops_per_token(1024) - config.flops_per_token(512) == 12 * config.n_layers * config.dim * 512


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                           ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                           ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("Tesla T4", None)])
def test_mfu_uses_the_datasheet_peak_of_the_exact_part(name, tflops):
    from model.device import datasheet_peak_for

    peak = datasheet_peak_for(name)
    assert (peak / 1e12 if peak else None) == tflops


def test_invalid_config_names_the_problem():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        preset("7b")


def test_initial_loss_is_near_uniform_and_falls_when_training():
    torch.manual_seed(0)
    config = preset("1m", vocab_size=256, max_seq_len=64)
    model = Transformer(config)
    data = torch.randint(0, 256, (8, 33))
    loss0 = language_model_loss(model(data[:, :-1]), data[:, 1:])
    assert abs(loss0.item() - torch.log(torch.tensor(256.0)).item()) < 0.3
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = language_model_loss(model(data[:, :-1]), data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < loss0.item() - 1.5


def test_ignore_index_masks_targets():
    logits = torch.randn(1, 4, 10)
    targets = torch.tensor([[1, -100, 2, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([1, 2]))
    assert torch.allclose(language_model_loss(logits, targets), expected)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1)
    return Transformer(preset("1m", vocab_size=512, max_seq_len=128)).eval()


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20]]


def test_greedy_with_cache_equals_without(tiny_model):
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=())
    cached = generate(tiny_model, PROMPTS, params, use_cache=True)
    uncached = generate(tiny_model, PROMPTS, params, use_cache=False)
    assert [c.token_ids for c in cached] == [u.token_ids for u in uncached]
    assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for c in cached)


def test_batch_output_does_not_depend_on_batch_mates(tiny_model):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7, stop_token_ids=())
    together = generate(tiny_model, PROMPTS, params)
    alone = [generate(tiny_model, [p], params)[0] for p in PROMPTS]
    assert [t.token_ids for t in together] == [a.token_ids for a in alone]


def test_seed_makes_sampling_reproducible(tiny_model):
    def sample(seed):
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed, stop_token_ids=())
        return generate(tiny_model, [PROMPTS[0]], params)[0].token_ids

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_top_k_one_is_greedy(tiny_model):
    greedy = generate(tiny_model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=()))
    top1 = generate(tiny_model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=0,
                                                        stop_token_ids=()))
    assert [g.token_ids for g in greedy] == [t.token_ids for t in top1]


def test_repetition_penalty_reduces_repeats(tiny_model):
    plain = generate(tiny_model, [PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=()))
    penalised = generate(tiny_model, [PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0,
                                                                  repetition_penalty=5.0, stop_token_ids=()))
    assert len(set(penalised[0].token_ids)) > len(set(plain[0].token_ids))


def test_stop_token_ends_sequence(tiny_model):
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=())
    free = generate(tiny_model, [PROMPTS[1]], params)[0].token_ids
    stopper = free[5]
    first = free.index(stopper)
    stopped = generate(tiny_model, [PROMPTS[1]], SamplingParams(max_new_tokens=30, temperature=0,
                                                                stop_token_ids=(stopper,)))[0]
    assert stopped.token_ids == free[:first] and stopped.finish_reason == "stop"


def test_prompt_too_long_is_refused(tiny_model):
    with pytest.raises(ValueError, match="context"):
        generate(tiny_model, [[1] * 200], SamplingParams(max_new_tokens=1))


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_streaming_text_and_stop_strings(builtin_tokenizer):
    torch.manual_seed(0)
    model = Transformer(preset("1m", vocab_size=builtin_tokenizer.vocab_size)).eval()
    prompt = builtin_tokenizer.encode("Return the value of", bos=True)
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=())
    full = generate(model, [prompt], params, tokenizer=builtin_tokenizer)[0]
    # the answer continues the prompt's text (its first word keeps its space)
    assert builtin_tokenizer.decode(prompt) + full.text == builtin_tokenizer.decode(prompt + full.token_ids)
    streamed = "".join(e.text for events in generate_stream(model, [prompt], params, builtin_tokenizer)
                       for e in events)
    assert streamed == full.text
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    if stop.strip():
        cut = generate(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(),
                                                       stop=(stop,)), builtin_tokenizer)[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_incremental_detokenizer_holds_back_stop_prefix(builtin_tokenizer):
    ids = builtin_tokenizer.encode("hello world")
    detok = IncrementalDetokenizer(builtin_tokenizer, stop=("world!",))
    text, stopped = "", False
    for token in ids:
        delta, stopped = detok.add(token)
        text += delta
    assert not stopped and "world" not in text  # could still become "world!"
    assert text + detok.flush() == "hello world"


def test_incremental_detokenizer_is_linear_in_the_answer(builtin_tokenizer):
    """Each token decodes a short window, not the whole answer again (which made streaming quadratic)."""
    class CountingTokenizer(type(builtin_tokenizer)):
        decoded = 0

        def decode(self, ids, skip_special=True):
            ids = list(ids)
            CountingTokenizer.decoded += len(ids)
            return super().decode(ids, skip_special)

    tokenizer = CountingTokenizer(builtin_tokenizer.sp, builtin_tokenizer.model_bytes)
    text = "Return the value of the attribute, or raise an error when it is missing. " * 12
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Docs:", bos=True)
    detok = IncrementalDetokenizer(tokenizer, stop=("never appears",), context=prompt)
    streamed = "".join(detok.add(t)[0] for t in ids) + detok.flush()
    assert tokenizer.decode(prompt) + streamed == tokenizer.decode(prompt + ids)
    assert len(ids) > 150 and CountingTokenizer.decoded < 30 * len(ids)  # quadratic: ~len(ids)**2


def test_sampling_is_numerically_safe_for_every_accepted_value():
    """Tiny temperatures, top-p, min-p and penalties (1e-40, 5e-324, the largest floats) never produce a
    NaN or an out-of-range token; a temperature below GREEDY_BELOW is the argmax; a row of NaN logits is
    reported bad without touching the other rows."""
    from model.generate import GREEDY_BELOW, sample

    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 30
    logits[3] = float("nan")
    logits[5, 7] = float("inf")
    params = [SamplingParams(temperature=5e-324), SamplingParams(temperature=1e-40, top_p=5e-324),
              SamplingParams(temperature=GREEDY_BELOW * 2, top_p=1e-40, repetition_penalty=1e-40),
              SamplingParams(temperature=1.0), SamplingParams(min_p=5e-324, repetition_penalty=5e-324),
              SamplingParams(temperature=1e-40), SamplingParams(temperature=2.0, top_k=3, min_p=1.0),
              SamplingParams(temperature=1.5, top_p=1e-40, repetition_penalty=10.0, top_logprobs=5)]
    seen = torch.rand(8, 50) > 0.5
    result = sample(logits, params, [0.999999999] * 4 + [0.0] * 4, seen)
    host = result.to_host()
    assert [bad for _, _, bad, _ in host] == [False, False, False, True, False, True, False, False]
    assert all(0 <= token < 50 for token, _, _, _ in host)
    assert all(math.isfinite(logprob) and logprob <= 0 for i, (_, logprob, _, _) in enumerate(host)
               if i not in (3, 5))
    assert host[0][0] == int(logits[0].argmax()) and host[1][0] == int(logits[1].argmax())
    assert host[6][0] == int(logits[6].argmax())  # min_p = 1 keeps only the most likely token
    assert host[7][3][0][1] == pytest.approx(float(torch.log_softmax(logits[7], -1).max()), abs=1e-5)
    # the good rows are what they are alone
    for row in (0, 1, 2, 4, 6, 7):
        alone = sample(logits[row:row + 1], [params[row]], [[0.999999999] * 4 + [0.0] * 4][0][row:row + 1],
                       seen[row:row + 1]).to_host()[0]
        assert alone[:3] == host[row][:3]


def test_sampled_tokens_follow_the_distribution():
    """Inverse-CDF sampling with per-row uniforms draws tokens at their probabilities (chi-square-free check:
    frequencies within a few standard errors), and top-k / top-p cut exactly the tokens they should."""
    from model.generate import sample

    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))[None].repeat(4000, 1)
    uniforms = [(i + 0.5) / 4000 for i in range(4000)]
    counts = torch.bincount(sample(logits, [SamplingParams()] * 4000, uniforms).tokens, minlength=4)
    assert counts.tolist() == [2000, 1000, 600, 400]
    top_p = sample(logits, [SamplingParams(top_p=0.7)] * 4000, uniforms).tokens  # keeps 0.5 + 0.25
    assert set(top_p.tolist()) == {0, 1} and abs(int((top_p == 0).sum()) - 2667) <= 2
    top_k = sample(logits, [SamplingParams(top_k=3)] * 4000, uniforms).tokens
    assert set(top_k.tolist()) == {0, 1, 2}
    min_p = sample(logits, [SamplingParams(min_p=0.4)] * 4000, uniforms).tokens  # p >= 0.2 stay
    assert set(min_p.tolist()) == {0, 1}


def test_logprobs_are_the_raw_model_distribution_and_match_scoring(tiny_model):
    """Each token's log-prob is log_softmax of the model's logits (before temperature and filters), the
    same number model.scoring gives for the finished text; top alternatives come most likely first."""
    from model.scoring import sequence_logprobs

    params = [SamplingParams(max_new_tokens=10, temperature=0, top_logprobs=3, stop_token_ids=()),
              SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.8, seed=5, stop_token_ids=()),
              SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, seed=6, repetition_penalty=1.5,
                             stop_token_ids=())]
    results = generate(tiny_model, PROMPTS, params)
    for prompt, result, sampling in zip(PROMPTS, results, params):
        assert len(result.logprobs) == len(result.token_ids) == sampling.max_new_tokens
        scored = sequence_logprobs(tiny_model, [prompt + result.token_ids])[0]
        assert result.logprobs == pytest.approx(scored.logprobs[len(prompt):], abs=1e-4)
    greedy = results[0]
    assert all(len(top) == 3 and top[0][0] == token and top[0][1] == pytest.approx(lp, abs=1e-6)
               for top, token, lp in zip(greedy.top_logprobs, greedy.token_ids, greedy.logprobs))
    assert results[1].top_logprobs == []  # not asked for


def test_a_poisoned_sequence_fails_alone(tiny_model):
    """A prompt whose token has a NaN embedding, and a forward pass that raises for one sequence, end only
    that sequence (with an error); the others decode exactly as they do alone."""
    class FailsOnToken(Transformer):  # a model whose forward raises whenever token 98 is in its input
        def forward(self, tokens, *args, **kwargs):
            if (tokens == 98).any():
                raise RuntimeError("broken kernel")
            return super().forward(tokens, *args, **kwargs)

    torch.manual_seed(1)  # untied, so that only the input embedding of token 99 is NaN
    failing = FailsOnToken(preset("1m", vocab_size=512, max_seq_len=128, tie_embeddings=False)).eval()
    with torch.no_grad():
        failing.embedding.weight[99] = float("nan")
    good = [[5, 6, 7], [9, 10, 11, 12], [20], [30, 31], [40, 41, 42, 43, 44]]
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=11, stop_token_ids=())
    prompts = good[:2] + [[1, 99, 3], [4, 98]] + good[2:]
    together = generate(failing, prompts, params)
    assert [c.finish_reason for c in together] == ["length"] * 2 + ["error"] * 2 + ["length"] * 3
    assert "finite" in together[2].error and "broken kernel" in together[3].error
    alone = [generate(failing, [p], params)[0].token_ids for p in good]
    assert [c.token_ids for c in together[:2] + together[4:]] == alone


def test_beam_search_finds_likely_answers(tiny_model):
    """Width 1 is greedy; scores are sums of the tokens' raw log-probs; n answers come best first and a
    wider beam finds an answer at least as likely as greedy's."""
    from model.generate import beam_search
    from model.scoring import sequence_logprobs

    prompt = PROMPTS[1]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=())
    greedy = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=()))[0]
    assert beam_search(tiny_model, prompt, params, width=1)[0].token_ids == greedy.token_ids
    beams = beam_search(tiny_model, prompt, params, width=4, n=3)
    assert len(beams) == 3 and all(b.finish_reason == "length" and len(b.token_ids) == 6 for b in beams)
    totals = [sum(b.logprobs) for b in beams]
    assert totals == sorted(totals, reverse=True) and totals[0] >= sum(greedy.logprobs) - 1e-5
    for beam in beams:
        scored = sequence_logprobs(tiny_model, [prompt + beam.token_ids])[0]
        assert beam.logprobs == pytest.approx(scored.logprobs[len(prompt):], abs=1e-4)
    stop = beams[0].token_ids[2]
    stopped = beam_search(tiny_model, prompt, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)), width=4)
    assert all(stop not in b.token_ids for b in stopped)


def _synced_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of test_synced_generation_under_zero3: a ZeRO-3 DeepSpeed engine on gloo (CPU)."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(preset("1m", vocab_size=256, max_seq_len=64))
    # Partition every parameter (small ones stay whole by default), so that each forward is a collective.
    engine, *_ = deepspeed.initialize(model=model, dist_init_required=False, config={
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    forwards = []
    engine.module.register_forward_hook(lambda *_: forwards.append(1))
    prompts, lengths = SYNCED_WORK[rank]
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, seed=i, stop_token_ids=()) for i, n in enumerate(lengths)]
    completions = generate(engine, prompts, params, synced=True)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps({
        "forwards": len(forwards), "tokens": [c.token_ids for c in completions],
        "logprobs": [c.logprobs for c in completions], "finish": [c.finish_reason for c in completions]}))
    del engine


# rank -> (prompts, max_new_tokens per prompt): different counts and lengths
SYNCED_WORK = {0: ([[5, 6, 7], [9, 10, 11, 12, 13], [20]], [12, 3, 7]), 1: ([[40, 41]], [2])}


def test_synced_generation_under_zero3_keeps_every_rank_in_step(tmp_path):
    """Two gloo processes with ZeRO-3 (every forward gathers parameters from all ranks) and different
    prompt counts and lengths per rank: synced generation runs the same number of forward passes on every
    rank, and each rank's answers equal the plain model's."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_synced_worker, args=(len(SYNCED_WORK), port, str(tmp_path)), nprocs=len(SYNCED_WORK))
    outcome = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in SYNCED_WORK]
    assert len({o["forwards"] for o in outcome}) == 1 and outcome[0]["forwards"] == 12  # the longest answer
    torch.manual_seed(0)
    plain = Transformer(preset("1m", vocab_size=256, max_seq_len=64)).eval()
    for rank, (prompts, lengths) in SYNCED_WORK.items():
        params = [SamplingParams(max_new_tokens=n, temperature=0.8, seed=i, stop_token_ids=())
                  for i, n in enumerate(lengths)]
        expected = generate(plain, prompts, params)
        assert outcome[rank]["tokens"] == [c.token_ids for c in expected]
        assert outcome[rank]["finish"] == ["length"] * len(prompts)
        for got, want in zip(outcome[rank]["logprobs"], expected):
            assert got == pytest.approx(want.logprobs, abs=1e-4)


def test_checkpoint_round_trip(tmp_path, tiny_model, builtin_tokenizer):
    save_checkpoint(tiny_model, tmp_path / "ckpt", builtin_tokenizer)
    loaded = load_model(tmp_path / "ckpt")
    tokens = torch.tensor([PROMPTS[1]])
    assert torch.equal(loaded(tokens), tiny_model(tokens))
    assert load_tokenizer(tmp_path / "ckpt").encode("abc") == builtin_tokenizer.encode("abc")
    assert not any(p.suffix == ".pt" or p.suffix == ".bin" for p in (tmp_path / "ckpt").iterdir())


def test_incomplete_checkpoint_is_refused(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("tie", [True, False])
def test_hugging_face_export_matches_transformers_and_imports_back(tmp_path, builtin_tokenizer, tie):
    transformers = pytest.importorskip("transformers")
    from model.hf import export_hf, import_hf

    torch.manual_seed(2)
    model = Transformer(preset("1m", vocab_size=builtin_tokenizer.vocab_size, tie_embeddings=tie)).eval()
    export_hf(model, tmp_path / "hf", builtin_tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.tensor([builtin_tokenizer.encode("The quick brown fox jumps over the lazy dog.", bos=True)])
    with torch.no_grad():
        difference = (model(tokens) - theirs(tokens).logits).abs().max().item()
    assert difference <= 1e-4
    imported, tokenizer = import_hf(tmp_path / "hf")
    for (name, ours), (_, back) in zip(model.state_dict().items(), imported.state_dict().items()):
        assert torch.equal(ours, back), name
    assert tokenizer.encode("same ids") == builtin_tokenizer.encode("same ids")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Tokenizers agree on text like this, with  spaces\nand lines."
    assert hf_tokenizer(text).input_ids == builtin_tokenizer.encode(text, bos=True)


def test_tokenizer_special_ids_and_chat_mask(builtin_tokenizer):
    tok = builtin_tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    encoding = tok.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
    ])
    assert encoding.ids[0] == tok.bos_id and len(encoding.ids) == len(encoding.assistant_mask)
    reply = [i for i, m in zip(encoding.ids, encoding.assistant_mask) if m]
    assert tok.decode(reply) == "Hello there." and reply[-1] == tok.end_of_turn_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.ids[-1] == tok.role_id("assistant") and not any(prompt.assistant_mask)


def test_tokenizer_round_trips_and_pickles(builtin_tokenizer):
    text = "def f(x):\n    return x ** 2  # ünïcode ✓ 中文"
    assert builtin_tokenizer.decode(builtin_tokenizer.encode(text)) == text
    clone = pickle.loads(pickle.dumps(builtin_tokenizer))
    assert clone.encode(text) == builtin_tokenizer.encode(text)


def test_chat_template_rejects_bad_messages(builtin_tokenizer):
    from model.tokenizer import ChatFormatError

    with pytest.raises(ChatFormatError, match=r"messages\[1\].role"):
        builtin_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])


def test_sequence_logprobs_match_a_plain_forward_and_do_not_depend_on_batching():
    """log p(token | prefix) per token equals log_softmax of one unpadded forward pass, whatever else
    shares the batch (right padding never leaks into a shorter sequence's scores)."""
    import torch

    from model.config import preset
    from model.llama import Transformer
    from model.scoring import sequence_logprobs, token_logprobs

    torch.manual_seed(0)
    model = Transformer(preset("1m", vocab_size=97, max_seq_len=32)).eval()
    sequences = [[5, 9, 11, 3, 40, 41], [7, 8], list(range(10, 30))]
    together = sequence_logprobs(model, sequences, top_n=3, batch_size=8)
    for ids, scores in zip(sequences, together):
        alone = sequence_logprobs(model, [ids], top_n=3)[0]
        assert scores.logprobs[0] is None and scores.top[0] is None
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        for t in range(1, len(ids)):
            assert scores.logprobs[t] == pytest.approx(float(reference[t - 1, ids[t]]), abs=1e-5)
            assert scores.logprobs[t] == pytest.approx(alone.logprobs[t], abs=1e-5)
            best = int(reference[t - 1].argmax())
            assert scores.top[t][0][0] == best and scores.is_greedy[t] == (ids[t] == best)
            assert [v for _, v in scores.top[t]] == sorted((v for _, v in scores.top[t]), reverse=True)
        assert scores.total(1) == pytest.approx(float(sum(reference[t - 1, ids[t]] for t in range(1, len(ids)))),
                                                abs=1e-4)
    logits = torch.randn(2, 5, 97, requires_grad=True)
    targets = torch.randint(0, 97, (2, 5))
    picked = token_logprobs(logits, targets)
    assert torch.allclose(picked, torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0], atol=1e-5)
    picked.sum().backward()
    assert logits.grad is not None
