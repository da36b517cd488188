"""NNX-level operations: the layer-input hook, the functional adapter, generic model
surgery (hard pruning, factorised layers) and activation quantization."""
