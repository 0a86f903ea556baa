"""Every HF sampling site draws from exactly the distribution it claims (issue 11, item 1): the online
samplers (plain and geometric mixture), `mnpo decode`'s HF backend and `mnpo evaluate`.

The model has 4096 tokens and a flat-ish next-token distribution (about 2/3 of the mass outside its top
50), and its generation_config.json sets its own temperature / top_p / top_k / min_p / repetition
penalty / suppressed tokens, none of which may leak in. Each test draws a few thousand one-token
samples of one prompt and compares them to the intended distribution: the mass drawn outside the top
50 and a chi-square test over bins of equal expected mass (fixed seeds; p > 1e-4 leaves a wide margin).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnpo.generation.mixture import SamplerSettings, generate_completions, mixture_next_token_probs

VOCAB = 4096
DRAWS = 4000
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
PROMPT = "w7 w8 w9"


def _build(path: Path, seed: int, generation_defaults: dict | None = None) -> Path:
    """A 1-layer Llama over a 4096-word vocabulary. initializer_range 0.4 spreads the logits just enough
    that the top 50 tokens hold about a third of the mass."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if generation_defaults is not None:
        model.generation_config = GenerationConfig(
            pad_token_id=0, bos_token_id=1, eos_token_id=2, **generation_defaults
        )
    model.save_pretrained(path)
    return path


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _prompt_ids(tokenizer) -> list[int]:
    from mnpo.data.chat import encode_prompt

    return encode_prompt(tokenizer, PROMPT)


@torch.no_grad()
def _next_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """`plain`: no generation defaults. `chatty`: a generation_config.json that, were it to leak, would
    sample at temperature 0.6 from its top 20 tokens, penalise the prompt and never draw its five most
    likely next tokens."""
    root = tmp_path_factory.mktemp("sampling_models")
    plain = _build(root / "plain", seed=1)
    chatty = _build(
        root / "chatty",
        seed=0,
        generation_defaults=dict(
            do_sample=True, temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.3
        ),
    )
    model, tokenizer = _load(chatty)
    top5 = _next_logits(model, _prompt_ids(tokenizer)).topk(5).indices.tolist()
    model.generation_config.suppress_tokens = top5
    model.generation_config.save_pretrained(chatty)
    return {"plain": plain, "chatty": chatty}


def assert_fits(draws: torch.Tensor, probs: torch.Tensor, bins: int = 20) -> None:
    """`draws` (N,) token ids look like N independent samples of `probs` (V,)."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    probs = probs.double() / probs.sum()
    assert counts[probs == 0].sum() == 0, "drew a token the intended distribution excludes"
    # The mass outside the 50 most likely tokens: exactly 0 under a hidden top-k of 50.
    top50 = probs.topk(50).indices
    expected_out = 1.0 - probs[top50].sum()
    drawn_out = 1.0 - counts[top50].sum() / n
    sd = (expected_out * (1 - expected_out) / n).sqrt()
    assert abs(drawn_out - expected_out) < 5 * sd + 1e-9, (
        f"mass outside top 50: drew {drawn_out:.3f}, expected {expected_out:.3f}"
    )
    # Chi-square over bins of about equal expected mass, tokens taken from most to least likely.
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    bin_of = torch.empty_like(order)
    bin_of[order] = (mass_before * bins).floor().long().clamp(max=bins - 1)
    observed = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, counts)
    expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, probs * n)
    used = expected > 0
    chi2 = ((observed[used] - expected[used]) ** 2 / expected[used]).sum()
    dof = int(used.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), chi2 / 2.0).item()
    assert p_value > 1e-4, (
        f"chi-square {chi2.item():.1f} on {dof} dof (p = {p_value:.2e}): not the intended distribution"
    )


def _online_draws(model, tokenizer, sampler: SamplerSettings, ref_model=None) -> torch.Tensor:
    ids = [_prompt_ids(tokenizer)] * (DRAWS // 2)
    draws = [
        generate_completions(model, tokenizer, ids, sampler, max_new_tokens=1, ref_model=ref_model, generator_seed=s)[
            2
        ][:, 0]
        for s in (0, 1)
    ]
    return torch.cat(draws)


def test_assert_fits_rejects_a_top_50_sampler():
    """The check itself: exact draws pass; draws from the top 50 only, or with the top 50 reordered, do not."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(VOCAB, generator=g) * 1.6, -1)
    assert_fits(torch.multinomial(probs, DRAWS, replacement=True, generator=g), probs)
    top50 = torch.zeros_like(probs).scatter(0, probs.topk(50).indices, probs.topk(50).values)
    with pytest.raises(AssertionError, match="outside top 50"):
        assert_fits(torch.multinomial(top50, DRAWS, replacement=True, generator=g), probs)
    # Same mass outside the top 50, but the top 50 probabilities reversed among themselves.
    top = probs.topk(50)
    shuffled = probs.clone().scatter(0, top.indices, top.values.flip(0))
    with pytest.raises(AssertionError, match="chi-square"):
        assert_fits(torch.multinomial(shuffled, DRAWS, replacement=True, generator=g), probs)


@pytest.mark.parametrize("name", ["plain", "chatty"])
def test_online_sampler_untruncated_is_the_policy(models, name):
    model, tokenizer = _load(models[name])
    probs = torch.softmax(_next_logits(model, _prompt_ids(tokenizer)), -1)
    assert 1.0 - probs.topk(50).values.sum() > 0.5  # the test model puts most mass outside the top 50
    assert_fits(_online_draws(model, tokenizer, SamplerSettings()), probs)


def test_online_sampler_with_its_own_temperature_and_top_k(models):
    """Knobs that are on act as set (temperature 0.7, top-k 200), not as the model's file says."""
    model, tokenizer = _load(models["chatty"])
    logits = _next_logits(model, _prompt_ids(tokenizer)) / 0.7
    kth = logits.topk(200).values[-1]
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    assert_fits(_online_draws(model, tokenizer, SamplerSettings(temperature=0.7, top_k=200)), probs)


def test_geometric_mixture_sampler_is_the_normalised_mixture(models):
    """Nash-MD's y' ~ pi^{1-c} pi_ref^c (algorithms.md 2.2), untruncated."""
    model, tokenizer = _load(models["chatty"])
    ref, _ = _load(models["plain"])
    ids = _prompt_ids(tokenizer)
    probs = mixture_next_token_probs(_next_logits(model, ids)[None], _next_logits(ref, ids)[None], 0.5)[0]
    assert_fits(_online_draws(model, tokenizer, SamplerSettings(mixture_coef=0.5), ref_model=ref), probs)


def test_decode_hf_backend_samples_the_policy(models):
    from mnpo.generation.backend import SamplingSettings
    from mnpo.generation.hf_backend import HFBackend

    backend = HFBackend(str(models["chatty"]), dtype="float32", device="cpu", batch_size=DRAWS // 2)
    ids = _prompt_ids(backend.tokenizer)
    probs = torch.softmax(_next_logits(backend.model, ids), -1)
    (completions,) = backend.generate([ids], seeds=[3], sampling=SamplingSettings(DRAWS, 1.0, 1.0, 1))
    assert_fits(torch.tensor([c.token_ids[0] for c in completions]), probs)


def test_evaluate_samples_the_policy(models):
    """`mnpo evaluate` returns text; every word token decodes to its own word and the special tokens to ''."""
    from mnpo.evaluation.config import EvaluateConfig
    from mnpo.evaluation.evaluate import generate_responses

    model, tokenizer = _load(models["chatty"])
    probs = torch.softmax(_next_logits(model, _prompt_ids(tokenizer)), -1)
    config = EvaluateConfig(
        models=[str(models["chatty"])], baseline=str(models["chatty"]), prompts="unused", judges=["oracle=unused"],
        output_dir="unused", max_new_tokens=1, temperature=1.0, top_p=1.0, batch_size=DRAWS // 2, dtype="float32",
        device="cpu",
    )  # fmt: skip
    texts = generate_responses(str(models["chatty"]), [PROMPT] * DRAWS, config)
    # Fold the special tokens into one outcome (id 0), since they all decode to ''.
    special = torch.tensor(tokenizer.all_special_ids)
    folded = probs.clone()
    folded[special] = 0.0
    folded[0] = probs[special].sum()
    draws = torch.tensor([tokenizer.convert_tokens_to_ids(t) if t else 0 for t in texts])
    assert_fits(draws, folded)


@pytest.mark.parametrize("mixture_coef", [0.0, 0.5])
def test_online_samplers_stop_at_the_models_end_of_turn_token(tmp_path, mixture_coef):
    """A chat model whose generation_config lists an end-of-turn id besides the tokenizer's EOS (Gemma's
    <end_of_turn>, Llama 3's <|eot_id|>): the online trainers' samplers stop there and mask after it,
    as decode and evaluate do. Before, they stopped only at tokenizer.eos_token_id and the completion
    ran on past the end of the turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from mnpo.data.chat import encode_prompt
    from mnpo.generation.mixture import SamplerSettings, completion_mask, generate_completions

    path = _build(tmp_path / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [encode_prompt(tokenizer, PROMPT)]
    with torch.no_grad():  # the greedy first token becomes the model's end-of-turn token
        end_of_turn = int(model(torch.tensor(ids)).logits[0, -1].argmax())
    assert end_of_turn != tokenizer.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, end_of_turn], pad_token_id=0)
    sampler = SamplerSettings(temperature=0.0, mixture_coef=mixture_coef)  # greedy: the first token is end_of_turn

    _, _, out = generate_completions(model, tokenizer, ids, sampler, max_new_tokens=8, ref_model=model)
    assert out[0].tolist() == [end_of_turn]  # stopped at once (before: 8 tokens, running on past the turn)
    assert completion_mask(torch.tensor([[end_of_turn, 7, 8]]), [tokenizer.eos_token_id, end_of_turn]).tolist() == [
        [1, 0, 0]
    ]
