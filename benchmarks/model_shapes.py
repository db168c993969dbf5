"""Real model shapes for random-weight benchmarks (no weights can be downloaded on the GPU machine)."""

from jinfer.models.config import ModelConfig, RopeScaling

SHAPES = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                head_dim=64, intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192, eos_token_ids=(2,)),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                                max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009)),
    # 8 KV heads in a small model: checks that split the KV pool over a mesh (SmolLM2's 3 heads do not split).
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                                max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009)),
}
