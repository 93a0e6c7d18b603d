"""The model a worker serves: loading it, and the CPU speed-ups applied to it once loaded
(fused Llama layers, quantization, weight packing; layer_swap is what the last two share)."""
