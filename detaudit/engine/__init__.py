"""detaudit's own small inference engine: continuous batching over a paged KV cache, stock or batch-invariant
kernels (docs/engine.md). Import the modules you need; this package imports nothing heavy on its own."""
