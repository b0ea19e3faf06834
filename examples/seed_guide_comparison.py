# The dilated_attention_pytorch guide's "Code Example: Comparing Outputs",
# verbatim except for the import: `from sparsedsl import ...` instead of
# `from dilated_attention_pytorch import ...`. It prints "Outputs are different: True".
import torch
from sparsedsl import (
    BlockSparseAttention, 
    BlockSparseDilatedAttention,
    SparsePatternConfig
)

# Configuration
seq_len = 2048
batch_size = 2
num_heads = 8
head_dim = 64

# Both use same block-sparse pattern
sparse_config = SparsePatternConfig(
    pattern_type="local_window",
    sparsity_ratio=0.1,
    block_size=256,
)

# Create models
block_sparse = BlockSparseAttention(sparse_config=sparse_config)
block_sparse_dilated = BlockSparseDilatedAttention(
    segment_lengths=[128, 128],
    dilation_rates=[1, 2],
    sparse_config=sparse_config,
)

# Input
x = torch.randn(batch_size, seq_len, num_heads, head_dim)

# Forward pass
output1 = block_sparse(x, x, x)        # Dense within blocks
output2 = block_sparse_dilated(x, x, x)  # Dilated within blocks

print(f"BlockSparse output shape: {output1.shape}")
print(f"BlockSparseDilated output shape: {output2.shape}")
print(f"Outputs are different: {not torch.allclose(output1, output2)}")
