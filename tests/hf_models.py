"""Tiny HuggingFace models from configs with random weights (no downloads), and how many
attention computations each runs."""
import torch
import transformers as T


def build(name: str, impl: str, layers: int = 2, seq: int = 10):
    """(model, args, kwargs, number of attention computations)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 100, (2, n), generator=g)  # noqa: E731
    common = dict(attn_implementation=impl)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_head=4, n_embd=32, vocab_size=100, n_positions=1024,
                           bos_token_id=0, eos_token_id=0, **common)
        return T.GPT2Model(cfg), (ids(seq),), {}, layers
    if name == "bert":
        cfg = T.BertConfig(num_hidden_layers=layers, num_attention_heads=4, hidden_size=32,
                           intermediate_size=64, vocab_size=100, **common)
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[0, seq - 3:] = 0   # padding in the first sequence
        return T.BertModel(cfg), (ids(seq),), {"attention_mask": mask}, layers
    if name == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            hidden_size=32, intermediate_size=64, vocab_size=100, **common)
        return T.LlamaModel(cfg), (ids(seq),), {}, layers
    if name == "t5":
        cfg = T.T5Config(num_layers=layers, num_decoder_layers=layers, num_heads=4, d_model=32,
                         d_kv=8, d_ff=64, vocab_size=100, dropout_rate=0.0, **common)
        return T.T5Model(cfg), (), {"input_ids": ids(seq), "decoder_input_ids": ids(7)}, 3 * layers
    if name == "vit":
        cfg = T.ViTConfig(num_hidden_layers=layers, num_attention_heads=4, hidden_size=32,
                          intermediate_size=64, image_size=32, patch_size=8, **common)
        return T.ViTModel(cfg), (torch.randn(2, 3, 32, 32, generator=g),), {}, layers
    if name == "bart":
        cfg = T.BartConfig(encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                           decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, vocab_size=100, **common)
        return T.BartModel(cfg), (ids(seq),), {"decoder_input_ids": ids(7)}, 3 * layers
    if name == "whisper":
        cfg = T.WhisperConfig(encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                              decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, vocab_size=100, num_mel_bins=8,
                              max_source_positions=16, max_target_positions=32, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, decoder_start_token_id=0, **common)
        return (T.WhisperModel(cfg), (torch.randn(2, 8, 32, generator=g),),
                {"decoder_input_ids": ids(7)}, 3 * layers)
    raise ValueError(name)


MODELS = ["gpt2", "bert", "llama", "t5", "vit", "bart", "whisper"]
