"""The real embedded assets. Dequantisation and tokenisation are cached under
$MEGATRON_DMC_CACHE (default ~/.cache/megatron_dmc); a cold cache costs about a minute."""

from __future__ import annotations

import pytest
import torch

from megatron_dmc.assets.corpus import corpus_sources, default_corpus, stratified_held_out
from tests.assets.helpers import needs_gensim, needs_smollm2

ENGLISH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the "
    "tower from 1887 to 1889. It was constructed as the centrepiece of the 1889 World's Fair."
)


@needs_gensim
def test_default_corpus_is_plain_english_text():
    sources = corpus_sources()
    assert len(sources["wikipedia"]) >= 100 and len(sources["news"]) >= 280
    documents = [doc for docs in sources.values() for doc in docs]
    assert sum(map(len, documents)) > 2_500_000
    markup = ("{{", "}}", "[[", "]]", "<ref", "&quot;", "'''")
    with_markup = [doc.split("\n")[0] for doc in documents if any(m in doc for m in markup)]
    assert with_markup in ([], ["ASCII"])  # the ASCII article quotes "{" and "|" as text
    assert documents[0].startswith("Anarchism\n\n")


def test_stratified_held_out_takes_from_every_source():
    chosen = stratified_held_out([100, 10], 0.1, seed=0)
    assert len(chosen) == 11 and sum(i >= 100 for i in chosen) == 1
    assert chosen == stratified_held_out([100, 10], 0.1, seed=0)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_hf_dir_is_a_working_llama():
    from transformers import AutoConfig, LlamaForCausalLM

    from megatron_dmc.assets import smollm2_hf_dir, smollm2_tokenizer

    path = smollm2_hf_dir()
    cfg = AutoConfig.from_pretrained(path)
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads)
    assert (*shape, cfg.num_key_value_heads, cfg.intermediate_size) == (30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.tie_word_embeddings) == (49152, True)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    tok = smollm2_tokenizer()
    assert (tok.eod_id, tok.vocab_size) == (0, 49152)
    ids = tok.encode(ENGLISH)
    assert tok.decode(ids) == ENGLISH
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert loss.exp() < 15, f"perplexity {loss.exp():.1f}: q/k layout or weights are wrong"


@pytest.mark.slow
@needs_smollm2
@needs_gensim
def test_default_corpus_dataset_has_a_disjoint_held_out_split():
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_dmc.assets import default_corpus_dataset, smollm2_tokenizer

    corpus = default_corpus_dataset(progress=False)
    train, held = IndexedDataset(corpus.train_prefix), IndexedDataset(corpus.held_out_prefix)
    assert len(train) + len(held) == len(default_corpus())
    assert 30 <= len(held) <= 50 and corpus.stats["corpus_held_out"]["tokens"] > 30_000
    assert corpus.stats["corpus"]["tokens"] == int(train.sequence_lengths.sum())
    first = {tuple(train[i][:32]) for i in range(len(train))}
    assert not first & {tuple(held[i][:32]) for i in range(len(held))}
    eod = smollm2_tokenizer().eod_id
    assert all(train[i][-1] == eod for i in range(len(train)))
