"""Qwen-Image 2.1: the single-stream DiT with prefix KV cache, the 64-channel 16x RGBA VAE, Qwen3-VL conditioning."""
